"""A whole run through the pipeline: the run directory, interruption and resume, failure marking."""

import json
import os
import signal

import pytest
import torch

from ftengine.core.errors import DataError
from ftengine.engine import pipeline
from ftengine.engine import settings
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
        assert settings.settings_of(model).max_seq_length == 40
    finally:
        regs.remove_plugin("recorder-plugin")
