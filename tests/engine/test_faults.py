"""Fault injection: kill -9 and a full disk at the write points of training, checkpointing and
export, then resume / re-export and compare with an uninterrupted run; two processes on one run
directory; NaN in a weight and in the loss."""

import json
import os
import re
import signal
import time

import pytest
import torch
from safetensors.torch import load_file

from ftengine.core.config import ExportEntry
from ftengine.core.errors import DiskFullError
from ftengine.core.errors import ExportError
from ftengine.core.errors import FtengineError
from ftengine.core.errors import NonFiniteError
from ftengine.core.errors import RunLockedError
from ftengine.engine import exporting
from ftengine.engine import pipeline
from ftengine.engine.export_source import export_run
from ftengine.engine.guard import NonFiniteGuard
from ftengine.engine.rundir import CHECKPOINT_MARKER
from ftengine.engine.rundir import RunDir

from .faultinject import KILLED
from .faultinject import in_child
from .faultinject import writes

STEPS, SAVE = 4, 2


def strict_records(path):
    """metrics.jsonl parsed as strict JSON (a NaN/Infinity literal fails)."""
    def refuse(name):
        raise AssertionError(f"{path}: non-strict JSON literal {name}")

    return [json.loads(line, parse_constant=refuse) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def config(demo_base, make_tiny_run_config, tmp_path_factory):
    from ftengine.demo import ASSETS

    cfg = make_tiny_run_config(demo_base, ASSETS / "data.jsonl", tmp_path_factory.mktemp("faults"),
                               max_steps=STEPS, save_steps=SAVE)
    cfg.export = [ExportEntry(format="lora")]
    return cfg


@pytest.fixture(scope="module")
def reference(config, tmp_path_factory):
    """The uninterrupted run every faulty one is compared with."""
    result = pipeline.run(config, run_dir=RunDir(tmp_path_factory.mktemp("reference") / "run"))
    return {"losses": result.train.losses,
            "adapter": load_file(result.run_dir.exports / "lora" / "adapter_model.safetensors")}


def assert_same_as_reference(run_dir, reference):
    assert run_dir.status()["status"] == "completed", run_dir.status()
    got = [(m["step"], m["loss"]) for m in strict_records(run_dir.metrics_path)]
    assert [s for s, _ in got] == list(range(1, STEPS + 1))
    for (_, loss), (_, want) in zip(got, reference["losses"], strict=True):
        assert loss == pytest.approx(want, rel=1e-5, abs=1e-6)
    adapter = load_file(run_dir.exports / "lora" / "adapter_model.safetensors")
    assert adapter.keys() == reference["adapter"].keys()
    for name, tensor in adapter.items():
        torch.testing.assert_close(tensor, reference["adapter"][name], rtol=1e-4, atol=1e-6)
    leftovers = [p for p in (*run_dir.path.iterdir(), *run_dir.exports.iterdir()) if ".partial-" in p.name
                 or ".tmp-" in p.name or ".old-" in p.name]
    assert not leftovers


def recover(config, run_dir):
    """What a user does after a crash: resume when something was kept, else start the run again."""
    if run_dir.config_path.exists() and (run_dir.latest_checkpoint() or run_dir.status().get("training")):
        return pipeline.run(config, run_dir=run_dir, resume=True)
    with pytest.raises(FtengineError, match="no complete checkpoint to resume from"):
        pipeline.run(config, run_dir=run_dir, resume=True)
    fresh = RunDir(run_dir.path.with_name(run_dir.path.name + "-again"))
    return pipeline.run(config, run_dir=fresh)


def _site(record, root):
    """A write point, independent of step numbers and random suffixes."""
    rel = os.path.relpath(record["path"], root)
    return record["event"], re.sub(r"\d+|[.](partial|tmp)-\w+", "#", rel)


@pytest.fixture(scope="module")
def write_points(config, tmp_path_factory):
    """Every distinct write point of a run (first occurrence of each), counted in a child."""
    root = tmp_path_factory.mktemp("count") / "run"
    log = root.parent / "writes.jsonl"
    assert in_child(lambda: pipeline.run(config, run_dir=RunDir(root)), root, "kill", 0, log) == 0
    seen, points = set(), []
    for record in writes(log):
        site = _site(record, root)
        if site not in seen:
            seen.add(site)
            points.append((record["n"], site))
    return points


def test_the_write_points_cover_training_checkpoints_and_exports(write_points):
    paths = " ".join(site[1] for _, site in write_points)
    for part in ("config.yaml", "run.json", "metrics.jsonl", "checkpoint-#/", "COMPLETE", "exports/", "lora"):
        assert part in paths, paths


def _kill_and_recover(config, reference, tmp_path, n):
    root = tmp_path / f"kill-{n}"
    code = in_child(lambda: pipeline.run(config, run_dir=RunDir(root)), root, "kill", n, tmp_path / f"w{n}.jsonl")
    assert code == KILLED
    if root.exists():
        assert RunDir(root).status().get("status") in (None, "interrupted")
    result = recover(config, RunDir(root))
    assert_same_as_reference(result.run_dir, reference)


def _representative(points):
    """One kill point per phase: the first checkpoint's files, its marker, the export, the last status."""
    wanted = [lambda s: "checkpoint-#/" in s and "COMPLETE" not in s, lambda s: s.endswith("COMPLETE"),
              lambda s: "exports" in s, lambda s: s == "run.json"]
    chosen = []
    for test in wanted[:3]:
        chosen.append(next(n for n, (_, s) in points if test(s)))
    chosen.append(max(n for n, (_, s) in points if wanted[3](s)))
    return chosen


def test_kill_at_a_write_point_of_each_phase_then_recover(config, reference, write_points, tmp_path):
    for n in _representative(write_points):
        _kill_and_recover(config, reference, tmp_path, n)


@pytest.mark.slow
def test_kill_at_every_write_point_then_recover(config, reference, write_points, tmp_path):
    for n, _ in write_points:
        _kill_and_recover(config, reference, tmp_path, n)


def test_a_full_disk_while_exporting_keeps_the_training_and_resume_finishes_the_export(
        config, reference, write_points, tmp_path):
    n = next(n for n, (_, s) in write_points if "exports" in s)
    root = tmp_path / "full"
    assert in_child(lambda: pipeline.run(config, run_dir=RunDir(root)), root, "enospc", n, tmp_path / "w.jsonl") == 0
    state = RunDir(root).status()
    assert state["status"] == "exports_failed" and state["training"] == "completed"
    assert "no space left on device" in state["export_errors"]["lora"]
    assert "bytes free" in state["export_errors"]["lora"] and "needs about" in state["export_errors"]["lora"]
    assert_same_as_reference(pipeline.run(config, run_dir=RunDir(root), resume=True).run_dir, reference)


def test_a_full_disk_while_checkpointing_fails_the_run_naming_the_path(config, reference, write_points, tmp_path):
    n = [n for n, (_, s) in write_points if "checkpoint-#/" in s][-1]
    root = tmp_path / "full"
    code = in_child(lambda: pipeline.run(config, run_dir=RunDir(root)), root, "enospc", n, tmp_path / "w.jsonl")
    assert code == 1
    error = (tmp_path / "w.jsonl.error").read_text()
    assert error.startswith("DiskFullError: ") and "checkpoint-" in error and "bytes" in error
    state = RunDir(root).status()
    assert state["status"] == "failed" and "no space left on device" in state["error"]
    assert_same_as_reference(recover(config, RunDir(root)).run_dir, reference)
    assert issubclass(DiskFullError, FtengineError)


def test_two_processes_cannot_use_one_run_directory(config, tmp_path):
    root = tmp_path / "run"
    ready, release = tmp_path / "ready", tmp_path / "release"

    def hold():
        run_dir = RunDir(root)
        with run_dir.lock("training"):
            run_dir.set_status("running")
            ready.touch()
            while not release.exists():
                time.sleep(0.05)

    pid = os.fork()
    if pid == 0:
        try:
            torch.set_num_threads(1)
            hold()
        finally:
            os._exit(0)
    try:
        while not ready.exists():
            time.sleep(0.05)
        (root / "config.yaml").write_text("model: {}\n")
        (root / "checkpoints" / "checkpoint-1").mkdir(parents=True)
        (root / "checkpoints" / "checkpoint-1" / CHECKPOINT_MARKER).write_text("1\n")
        with pytest.raises(RunLockedError, match=f"in use by pid {pid} \\(training\\)"):
            pipeline.run(config, run_dir=RunDir(root), resume=True)
        with pytest.raises(RunLockedError, match=f"pid {pid}"):
            export_run(root, ("lora",), None)
        assert RunDir(root).status()["status"] == "running"
        os.kill(pid, signal.SIGKILL)  # killed while holding it: the kernel frees the lock
        os.waitpid(pid, 0)
        pid = 0
        state = RunDir(root).status()
        assert state["status"] == "interrupted" and "stopped without finishing" in state["error"]
    finally:
        release.touch()
        if pid:
            os.waitpid(pid, 0)


def test_an_infinite_learning_rate_stops_at_once_and_keeps_the_weights(config, tmp_path):
    cfg = config.model_copy(deep=True)
    cfg.training.__dict__["learning_rate"] = float("inf")  # past validation, which refuses it
    with pytest.raises(NonFiniteError, match="non-finite learning rate at step 1") as err:
        pipeline.run(cfg, run_dir=RunDir(tmp_path / "run"))
    run_dir = RunDir(tmp_path / "run")
    state = run_dir.status()
    assert state["status"] == "failed" and state["error"].startswith("non-finite learning rate at step 1")
    assert run_dir.latest_checkpoint() is None and "last good checkpoint: none" in str(err.value)
    assert not run_dir.exports.exists()


def test_without_the_guard_an_infinite_learning_rate_completes_with_a_nan_adapter(config, tmp_path, monkeypatch):
    """What the guard prevents: the same run with its checks switched off 'completes'."""
    monkeypatch.setattr(NonFiniteGuard, "_problem", lambda self, model, optimizer: None)
    monkeypatch.setattr(NonFiniteGuard, "on_optimizer_step", lambda self, args, state, control, **kw: control)
    monkeypatch.setattr(exporting, "first_non_finite", lambda named: None)
    cfg = config.model_copy(deep=True)
    cfg.training.__dict__["learning_rate"] = float("inf")
    result = pipeline.run(cfg, run_dir=RunDir(tmp_path / "run"))
    assert result.run_dir.status()["status"] == "completed"
    adapter = load_file(result.run_dir.exports / "lora" / "adapter_model.safetensors")
    assert any(not torch.isfinite(t).all() for name, t in adapter.items() if "lora_B" in name)


def _nan_loss_at(step):
    """A forward hook making the final norm's output NaN on the ``step``-th training forward."""
    calls = [0]

    def hook(module, inputs, output):
        if module.training:
            calls[0] += 1
            if calls[0] == step:
                return output * float("nan")
        return output

    return hook


@pytest.fixture
def nan_at_step_3(monkeypatch):
    real_adapt = pipeline.adapt

    def adapt(*args, **kwargs):
        loaded = real_adapt(*args, **kwargs)
        loaded.model.get_base_model().model.norm.register_forward_hook(_nan_loss_at(3))
        return loaded

    monkeypatch.setattr(pipeline, "adapt", adapt)


def test_a_nan_loss_stops_the_run_and_keeps_the_last_good_checkpoint(config, tmp_path, nan_at_step_3):
    with pytest.raises(NonFiniteError, match="non-finite loss at step 3"):
        pipeline.run(config, run_dir=RunDir(tmp_path / "run"))
    run_dir = RunDir(tmp_path / "run")
    assert run_dir.status()["error"].startswith("non-finite loss at step 3")
    assert run_dir.latest_checkpoint().name == "checkpoint-2"
    assert not (run_dir.checkpoints / "checkpoint-3").exists() and not (run_dir.checkpoints / "checkpoint-4").exists()
    assert [m["step"] for m in strict_records(run_dir.metrics_path)][:2] == [1, 2]


def test_skip_step_drops_the_nan_step_and_completes(config, tmp_path, nan_at_step_3):
    cfg = config.model_copy(deep=True)
    cfg.training.on_nonfinite = "skip_step"
    result = pipeline.run(cfg, run_dir=RunDir(tmp_path / "run"))
    assert result.train.skipped_steps == [3] and result.run_dir.status()["summary"]["skipped_steps"] == [3]
    adapter = load_file(result.run_dir.exports / "lora" / "adapter_model.safetensors")
    assert all(torch.isfinite(t).all() for t in adapter.values())
    strict_records(result.run_dir.metrics_path)


def test_skip_step_stops_past_max_nonfinite_steps(config, tmp_path, nan_at_step_3):
    cfg = config.model_copy(deep=True)
    cfg.training.on_nonfinite, cfg.training.max_nonfinite_steps = "skip_step", 0
    with pytest.raises(NonFiniteError, match="1 steps skipped, more than training.max_nonfinite_steps=0"):
        pipeline.run(cfg, run_dir=RunDir(tmp_path / "run"))


def test_a_nan_weight_is_never_exported(demo_base, tmp_path):
    import ftengine

    model, tokenizer = ftengine.load_model(str(demo_base), max_seq_length=64, dtype="float32")
    name, param = list(model.named_parameters())[5]
    with torch.no_grad():
        param[0, 0] = float("nan")
    with pytest.raises(ExportError, match=f"tensor {re.escape(name)} holds inf or nan"):
        ftengine.export(model, tokenizer, str(tmp_path / "out"), format="merged")
    assert not (tmp_path / "out").exists() and not list(tmp_path.iterdir())
