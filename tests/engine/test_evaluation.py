"""Evaluation and logging: eval_loss in metrics.jsonl, the progress line, run.json and loss.png; early
stopping and best-model settings checked; report_to through transformers' integrations."""

import json
import struct

import pytest
import torch

from ftengine.core.config import validate_config
from ftengine.core.errors import ConfigError
from ftengine.engine import pipeline
from ftengine.engine import run_data


def with_eval(config, **training):
    """``config`` with 2% of its data held out and ``training`` keys set, validated again."""
    raw = config.model_dump(mode="json")
    raw["data"]["eval_fraction"] = 0.02
    raw["training"].update(training)
    return validate_config(raw)


def test_eval_loss_reaches_metrics_summary_and_plot(tiny_config, capsys):
    config = with_eval(tiny_config(max_steps=4), eval_steps=2)
    result = pipeline.run(config)
    records = result.run_dir.read_metrics()
    evals = [r for r in records if "eval_loss" in r]
    assert [r["step"] for r in evals] == [2, 4]
    assert result.train.eval_losses == [(r["step"], r["eval_loss"]) for r in evals]
    assert json.loads((result.run_dir.path / "run.json").read_text())["summary"]["last_eval_loss"] == evals[-1][
        "eval_loss"]
    assert (result.run_dir.path / "loss.png").stat().st_size > 0
    assert "step 4/4 | eval_loss" in capsys.readouterr().err
    # The last evaluation is the final model's mean token loss on the held-out rows (one batch).
    _, eval_ds, _ = run_data.data(pipeline.LoadedModel(result.model, result.tokenizer, None), config)
    from ftengine.plugins.trainers.collator import PadCollator

    batch = PadCollator(result.tokenizer.pad_token_id)(eval_ds.to_list())
    result.model.eval()
    with torch.no_grad():
        expected = result.model(**batch).loss.item()
    assert evals[-1]["eval_loss"] == pytest.approx(expected, rel=1e-4)


def test_early_stopping_needs_evaluations():
    base = {"model": {"name_or_path": "-"}, "export": []}
    with pytest.raises(ConfigError, match="training.eval_steps: early_stopping_patience"):
        validate_config({**base, "training": {"early_stopping_patience": 2}})
    with pytest.raises(ConfigError, match="save_steps: load_best_model_at_end needs it to be a multiple of eval_steps"):
        validate_config({**base, "training": {"load_best_model_at_end": True, "eval_steps": 3, "save_steps": 10}})
    with pytest.raises(ConfigError, match="training.report_to"):
        validate_config({**base, "training": {"report_to": "comet"}})


def test_early_stopping_stops(tiny_config):
    config = with_eval(tiny_config(max_steps=30, save_steps=1, learning_rate=0.5), eval_steps=1,
                       early_stopping_patience=1, load_best_model_at_end=True)
    result = pipeline.run(config)
    evals = [loss for _, loss in result.train.eval_losses]
    # stopped once an evaluation did not improve on the best so far
    assert result.train.steps < 30 and evals[-1] >= min(evals[:-1])


def crc32c(data):
    """CRC-32C (Castagnoli, reflected polynomial 0x82F63B78), bit by bit."""
    crc = 0xFFFFFFFF
    for byte in data:
        crc ^= byte
        for _ in range(8):
            crc = (crc >> 1) ^ (0x82F63B78 if crc & 1 else 0)
    return crc ^ 0xFFFFFFFF


def masked_crc(data):
    crc = crc32c(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def tfrecords(blob):
    """The records of a TFRecord file: u64 length, masked CRC of the length, data, masked CRC of the data."""
    position = 0
    while position < len(blob):
        header = blob[position:position + 8]
        (length,), (length_crc,) = struct.unpack("<Q", header), struct.unpack("<I", blob[position + 8:position + 12])
        data = blob[position + 12:position + 12 + length]
        (data_crc,) = struct.unpack("<I", blob[position + 12 + length:position + 16 + length])
        assert length_crc == masked_crc(header) and data_crc == masked_crc(data)
        yield data
        position += 16 + length


def proto_fields(message):
    """(field number, value) pairs of a protobuf message: varints as ints, 64/32-bit fields as raw bytes,
    length-delimited fields as bytes."""
    position = 0

    def varint():
        nonlocal position
        value, shift = 0, 0
        while True:
            byte = message[position]
            position += 1
            value |= (byte & 0x7F) << shift
            shift += 7
            if byte < 0x80:
                return value

    while position < len(message):
        key = varint()
        number, wire = key >> 3, key & 7
        if wire == 0:
            yield number, varint()
        elif wire == 1:
            yield number, message[position:position + 8]
            position += 8
        elif wire == 5:
            yield number, message[position:position + 4]
            position += 4
        else:
            assert wire == 2, wire
            length = varint()
            yield number, message[position:position + length]
            position += length


def scalars(path):
    """{tag: [(step, value)]} of an event file: Event (step = 2, summary = 5) > Summary.Value (field 1) >
    tag (1), simple_value (2, float32)."""
    out = {}
    for record in tfrecords(path.read_bytes()):
        event = list(proto_fields(record))
        step = next((v for n, v in event if n == 2), 0)
        for summary in (v for n, v in event if n == 5):
            for value in (v for n, v in proto_fields(summary) if n == 1):
                fields = dict(proto_fields(value))
                if 2 in fields:
                    out.setdefault(fields[1].decode(), []).append((step, struct.unpack("<f", fields[2])[0]))
    return out


def test_report_to_tensorboard_writes_events(tiny_config):
    result = pipeline.run(tiny_config(report_to="tensorboard", max_steps=3))
    (events,) = result.run_dir.path.rglob("events.out.tfevents.*")
    logged = scalars(events)["train/loss"]
    assert [step for step, _ in logged] == [1, 2, 3]
    assert [value for _, value in logged] == pytest.approx([loss for _, loss in result.train.losses], rel=1e-6)
