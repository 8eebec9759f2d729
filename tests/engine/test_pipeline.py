"""A whole run through the pipeline: the run directory, interruption and resume, failure marking."""

import json
import os
import signal

import pytest
import torch

from ftengine.core.errors import ConfigError
from ftengine.core.errors import DataError
from ftengine.engine import pipeline
from ftengine.engine.progress import ProgressCallback
from ftengine.engine.rundir import CHECKPOINT_MARKER
from ftengine.engine.rundir import RunDir


def test_run_directory(tiny_config):
    result = pipeline.run(tiny_config(save_steps=2))
    path = result.run_dir.path
    assert (path / "config.yaml").read_text().startswith("model:")
    metrics = [json.loads(line) for line in (path / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2, 3, 4]
    for m in metrics:
        assert {"step", "loss", "learning_rate", "tokens_per_second"} <= set(m)
        assert m["tokens_per_second"] > 0
    assert (path / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    checkpoints = sorted((path / "checkpoints").glob("checkpoint-*"))
    assert [p.name for p in checkpoints] == ["checkpoint-2", "checkpoint-4"]
    assert all((p / CHECKPOINT_MARKER).exists() for p in checkpoints)
    status = json.loads((path / "run.json").read_text())
    assert status["status"] == "completed" and status["summary"]["steps"] == 4
    assert "attention: sdpa (auto)" in status["summary"]["notes"]
    report = json.loads((path / "data_report.json").read_text())
    assert report["format"] == "messages" and report["samples"] == report["rows"] > 100
    assert 0 < report["trained_tokens"] < report["tokens"]


def test_interrupt_then_resume_matches_uninterrupted(tiny_config, monkeypatch):
    full = pipeline.run(tiny_config(max_steps=6))
    expected = full.train.losses

    original = ProgressCallback.on_log
    sent = []

    def interrupt_at_step_3(self, args, state, control, logs=None, **kwargs):
        original(self, args, state, control, logs=logs, **kwargs)
        if state.global_step == 3 and not sent:
            sent.append(True)
            os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(ProgressCallback, "on_log", interrupt_at_step_3)
    cut = pipeline.run(tiny_config(max_steps=6))
    monkeypatch.setattr(ProgressCallback, "on_log", original)
    assert cut.train.interrupted and cut.train.steps == 3
    assert cut.run_dir.status()["status"] == "interrupted"
    assert cut.exports == {}
    assert cut.run_dir.latest_checkpoint().name == "checkpoint-3"

    resumed = pipeline.run(tiny_config(max_steps=6), run_dir=RunDir(cut.run_dir.path), resume=True)
    assert resumed.run_dir.status()["status"] == "completed"
    got = [(m["step"], m["loss"]) for m in resumed.run_dir.read_metrics()]
    assert [s for s, _ in got] == [1, 2, 3, 4, 5, 6]
    for (step, loss), (step_ref, loss_ref) in zip(got, expected, strict=True):
        assert step == step_ref and loss == pytest.approx(loss_ref, rel=1e-5, abs=1e-6)


def test_incomplete_checkpoint_is_never_resumed(tmp_path):
    run_dir = RunDir(tmp_path)
    (tmp_path / "checkpoints" / "checkpoint-2").mkdir(parents=True)
    (tmp_path / "checkpoints" / "checkpoint-2" / CHECKPOINT_MARKER).write_text("2")
    (tmp_path / "checkpoints" / "checkpoint-4").mkdir()
    assert run_dir.latest_checkpoint().name == "checkpoint-2"


def test_a_failing_run_is_marked_failed(tiny_config, tmp_path):
    data = tmp_path / "data.jsonl"
    good = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
    data.write_text(json.dumps(good) + "\n" + json.dumps({"messages": [{"role": "user", "content": "hi"}]}) + "\n")
    config = tiny_config()
    config.data.path = str(data)
    with pytest.raises(DataError, match=r"data.jsonl: row 2: .*messages"):
        pipeline.run(config)
    (run,) = (tmp_path / "runs").iterdir()
    assert RunDir(run).status()["status"] == "failed"
    assert not (run / "exports").exists()


# ----------------------------------------------------------------------------- attention implementation


@pytest.mark.parametrize(("requested", "packing", "cuda", "expected"), [
    ("auto", False, False, "sdpa"),
    ("auto", True, False, "sdpa"),  # FlexAttention has no backward on the CPU
    ("auto", False, True, "sdpa"),
    ("auto", True, True, "flex_attention"),
    ("sdpa", True, True, "sdpa"),
    ("eager", False, False, "eager"),
    ("flex_attention", False, False, "flex_attention"),
])
def test_auto_attention_is_flex_for_packed_rows_on_cuda(monkeypatch, requested, packing, cuda, expected):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    assert pipeline.resolve_attn_implementation(requested, packing) == expected


def test_auto_attention_keeps_to_what_the_model_class_implements(monkeypatch):
    from transformers import Gemma2Config
    from transformers import LlamaConfig

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert pipeline.supported_attn_implementations(LlamaConfig()) == ("sdpa", "flex_attention", "eager")
    gemma2 = pipeline.supported_attn_implementations(Gemma2Config())
    assert gemma2 == ("flex_attention", "eager")
    assert pipeline.resolve_attn_implementation("auto", False, gemma2) == "eager"
    assert pipeline.resolve_attn_implementation("auto", True, gemma2) == "flex_attention"
    assert pipeline.resolve_attn_implementation("auto", True, ("sdpa", "eager")) == "sdpa"
    with pytest.raises(ConfigError, match=r"model.attn_implementation: 'sdpa' is not implemented .*\(gemma2\); "
                                          r"use auto or one of: flex_attention, eager"):
        pipeline.choose_attn_implementation("sdpa", False, Gemma2Config())


def test_preflight_refuses_flex_attention_training_without_cuda(tiny_config, tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    config = tiny_config()
    config.model.attn_implementation = "flex_attention"
    with pytest.raises(ConfigError) as err:
        pipeline.run(config)
    assert str(err.value) == pipeline.FLEX_NEEDS_CUDA and "\n" not in str(err.value)
    assert "use sdpa, or auto" in str(err.value)
    assert not (tmp_path / "runs").exists()


def test_the_summary_names_the_attention_in_use(demo_base):
    from ftengine.core.config import validate_config

    for attention, packing, note in [
        ("auto", False, "attention: sdpa (auto)"),
        ("auto", True, "attention: sdpa (auto; packed rows: a dense block-diagonal mask over each row)"),
        ("flex_attention", True, "attention: flex_attention (packed rows: a FlexAttention document mask, blocks "
                                 "across samples skipped)"),
    ]:
        config = validate_config({"model": {"name_or_path": str(demo_base), "dtype": "float32",
                                            "attn_implementation": attention}, "data": {"packing": packing}})
        loaded = pipeline.load(config)
        assert loaded.notes[1] == note
        assert loaded.model.config._attn_implementation == note.split()[1]


def test_the_api_switches_an_auto_model_to_flex_for_packed_rows_on_cuda(demo_base, monkeypatch):
    import ftengine

    model, _ = ftengine.load_model(str(demo_base), dtype="float32")
    model = ftengine.add_lora(model, r=4, use_gradient_checkpointing=False)
    assert model.config._attn_implementation == "sdpa"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert pipeline.attention_for_rows(model, packed=False) == "sdpa"
    assert pipeline.attention_for_rows(model, packed=True) == "flex_attention"
    attention = model.base_model.model.model.layers[0].self_attn
    assert attention.config._attn_implementation == "flex_attention"  # what the patched attention dispatches on
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert pipeline.attention_for_rows(model, packed=False) == "sdpa"
    eager, _ = ftengine.load_model(str(demo_base), dtype="float32", attn_implementation="eager")
    assert pipeline.attention_for_rows(eager, packed=True) == "eager"  # an explicit choice is kept


def test_the_api_refuses_to_train_flex_attention_without_cuda(demo_base, tmp_path, monkeypatch):
    import ftengine
    from ftengine.demo import ASSETS

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match="load_model.attn_implementation: expected 'auto', 'sdpa'"):
        ftengine.load_model(str(demo_base), attn_implementation="flash")
    model, tokenizer = ftengine.load_model(str(demo_base), dtype="float32", attn_implementation="flex_attention")
    dataset = ftengine.load_dataset(str(ASSETS / "data.jsonl"), tokenizer, max_seq_length=64, max_rows=8,
                                    packing=True)
    with pytest.raises(ConfigError, match="flex_attention trains on a CUDA GPU only"):
        ftengine.train(model, tokenizer, dataset, max_steps=1, output_dir=str(tmp_path / "run"))
    assert not (tmp_path / "run").exists()


class RequestRecorder:
    """A trainer plugin that records the request it gets and trains as ``sft`` does."""

    name, sample_kinds = "recorder", ("conversation", "completion", "text")

    def __init__(self):
        self.requests = []

    def create(self, request):
        from ftengine.core import plugins

        self.requests.append(request)
        return plugins.get("trainers", "sft").create(request)


def test_trainers_get_the_model_settings_in_the_request_not_on_the_model(tiny_config, demo_base):
    import ftengine
    from ftengine.core import plugins

    recorder = RequestRecorder()
    hooks = type("Hooks", (), {"register_trainers": ftengine.hookimpl(lambda self, register: register(recorder))})
    regs = plugins.registries()
    regs.add_plugin(hooks(), name="recorder-plugin")
    try:
        config = tiny_config(trainer="recorder", max_steps=1)
        config.model.max_seq_length = 48
        pipeline.run(config)
        request = recorder.requests[-1]
        assert request.max_seq_length == 48
        assert request.attn_implementation == "sdpa"
        assert not hasattr(request.model, "max_seq_length")
        model, _ = ftengine.load_model(str(demo_base), max_seq_length=40, dtype=torch.float32)
        assert next(model.parameters()).dtype == torch.float32
        model = ftengine.add_lora(model, r=4, use_gradient_checkpointing=False)
        assert pipeline.settings_of(model).max_seq_length == 40
    finally:
        regs.remove_plugin("recorder-plugin")
