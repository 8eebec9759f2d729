"""Evaluation and logging: eval_loss in metrics.jsonl, the progress line, run.json and loss.png; early
stopping and best-model settings checked; report_to through transformers' integrations."""

import json

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


def test_report_to_tensorboard_writes_events(tiny_config):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    result = pipeline.run(tiny_config(report_to="tensorboard", max_steps=3))
    events = list(result.run_dir.path.rglob("events.out.tfevents.*"))
    assert events
    accumulator = EventAccumulator(str(events[0].parent))
    accumulator.Reload()
    logged = [e.value for e in accumulator.Scalars("train/loss")]
    assert logged == pytest.approx([loss for _, loss in result.train.losses], rel=1e-5)
