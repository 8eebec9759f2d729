"""The run directory's lifecycle: atomic writes with the user's umask, leftovers of killed writers,
overwriting an export, a torn metrics line, strict JSON, the lock and a stale ``running`` status."""

import json
import os
import stat

import pytest

from ftengine.core.errors import RunLockedError
from ftengine.engine.rundir import RunDir
from ftengine.engine.rundir import append_jsonl
from ftengine.engine.rundir import atomic_directory
from ftengine.engine.rundir import atomic_write_text
from ftengine.engine.rundir import remove_leftovers


def test_atomic_writes_follow_the_umask(tmp_path):
    old = os.umask(0o027)
    try:
        atomic_write_text(tmp_path / "a.txt", "x")
        with atomic_directory(tmp_path / "out") as staging:
            (staging / "f").write_text("y")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "a.txt").stat().st_mode) == 0o640
    assert stat.S_IMODE((tmp_path / "out").stat().st_mode) == 0o750


def test_overwrite_keeps_the_old_export_until_the_new_one_is_complete(tmp_path):
    target = tmp_path / "merged"
    target.mkdir()
    (target / "model.safetensors").write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_directory(target, overwrite=True) as staging:
            (staging / "model.safetensors").write_text("half")
            raise RuntimeError("the exporter failed")
    assert (target / "model.safetensors").read_text() == "old"
    with atomic_directory(target, overwrite=True) as staging:
        (staging / "model.safetensors").write_text("new")
        assert (target / "model.safetensors").read_text() == "old"
    assert (target / "model.safetensors").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merged"]


def test_leftovers_of_killed_writers_are_removed_and_a_moved_aside_export_restored(tmp_path):
    (tmp_path / ".lora.partial-abc").mkdir()
    (tmp_path / ".lora.partial-abc" / "adapter_model.safetensors").write_text("half")
    (tmp_path / ".run.json.tmp-x1").write_text("{")
    (tmp_path / ".merged.old-123").mkdir()  # killed between moving the old export aside and renaming the new
    (tmp_path / ".merged.old-123" / "model.safetensors").write_text("old")
    (tmp_path / "gguf").mkdir()
    (tmp_path / ".gguf.old-9").mkdir()  # killed after the new one was in place
    done = remove_leftovers(tmp_path)
    assert len(done) == 4
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gguf", "merged"]
    assert (tmp_path / "merged" / "model.safetensors").read_text() == "old"


def test_a_torn_metrics_line_is_skipped_and_the_next_record_stays_whole(tmp_path):
    run_dir = RunDir(tmp_path)
    run_dir.metrics_path.write_text(json.dumps({"step": 1, "loss": 2.0}) + "\n" + '{"step": 2, "lo')
    assert run_dir.read_metrics() == [{"step": 1, "loss": 2.0}]
    append_jsonl(run_dir.metrics_path, {"step": 2, "loss": float("nan"), "grad_norm": float("inf")})
    assert run_dir.read_metrics() == [{"step": 1, "loss": 2.0}, {"step": 2, "loss": None, "grad_norm": None}]
    run_dir.truncate_metrics(1)
    assert run_dir.metrics_path.read_text() == json.dumps({"step": 1, "loss": 2.0}) + "\n"


def test_status_is_strict_json(tmp_path):
    run_dir = RunDir(tmp_path)
    run_dir.set_status("failed", summary={"last_loss": float("nan")})
    text = (tmp_path / "run.json").read_text()
    assert "NaN" not in text and json.loads(text)["summary"]["last_loss"] is None


def test_the_lock_names_its_holder_and_a_stale_running_status_reads_interrupted(tmp_path):
    run_dir = RunDir(tmp_path)
    with run_dir.lock("training"):
        run_dir.set_status("running")
        assert run_dir.status()["status"] == "running"
        with pytest.raises(RunLockedError, match=f"in use by pid {os.getpid()} \\(training\\)"):
            with RunDir(tmp_path).lock("export"):
                pass
    assert run_dir.status()["status"] == "interrupted"
    assert json.loads((tmp_path / "run.json").read_text())["status"] == "running"  # the record is left as it was
