"""A whole run through the pipeline: the run directory, interruption and resume, failure marking."""

import json
import os
import signal

import pytest

from ftengine.core import pipeline
from ftengine.core.errors import DataError
from ftengine.core.progress import ProgressCallback
from ftengine.core.rundir import CHECKPOINT_MARKER
from ftengine.core.rundir import RunDir


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
