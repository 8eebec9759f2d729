"""The export stage: one loop for a run's exports and ``ftengine export``, atomic directories, and an
unwritable output directory as one line that leaves the existing export as it was."""

import os
import stat

import pytest

import ftengine
from ftengine.core.config import ExportEntry
from ftengine.core.errors import ExportError
from ftengine.engine import rundir
from ftengine.engine.exporting import export_all


@pytest.fixture
def lora_model(demo_base):
    model, tokenizer = ftengine.load_model(str(demo_base), dtype="float32")
    return ftengine.add_lora(model, r=4, use_gradient_checkpointing=False), tokenizer


def unwritable(directory, monkeypatch):
    """``directory`` made read-only; as root (who writes anyway) the staging directory's creation
    fails as the kernel would fail it."""
    directory.chmod(stat.S_IRUSR | stat.S_IXUSR)
    if os.geteuid() == 0:
        def refuse(dir=None, **kwargs):
            raise PermissionError(13, "Permission denied", str(dir))

        monkeypatch.setattr(rundir.tempfile, "mkdtemp", refuse)


def test_an_unwritable_directory_is_one_line_and_the_old_export_stays(lora_model, tmp_path, monkeypatch):
    model, tokenizer = lora_model
    out = tmp_path / "exports"
    done, _ = export_all(model, tokenizer, [ExportEntry(format="lora")], out)
    before = sorted(p.name for p in (out / "lora").iterdir())
    unwritable(out, monkeypatch)
    try:
        with pytest.raises(ExportError) as err:
            export_all(model, tokenizer, [ExportEntry(format="lora")], out, overwrite=True)
    finally:
        out.chmod(stat.S_IRWXU)
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith(f"export lora: cannot write into {out}: permission denied")
    assert message.endswith("the existing export there is unchanged")
    assert sorted(p.name for p in (out / "lora").iterdir()) == before
    assert sorted(p.name for p in out.iterdir()) == ["lora"]  # no staging directory left behind


def test_a_run_keeps_going_past_a_failed_export_and_records_the_others(lora_model, tmp_path):
    model, tokenizer = lora_model
    entries = [ExportEntry(format="merged", dtype="float16"), ExportEntry(format="gguf", chat_template="no_such"),
               ExportEntry(format="lora")]
    recorded = []
    done, failed = export_all(model, tokenizer, entries, tmp_path, keep_going=True,
                              on_done=lambda name, path: recorded.append((name, path.name)))
    assert recorded == [("merged", "merged"), ("lora", "lora")] and set(done) == {"merged", "lora"}
    assert list(failed) == ["gguf"] and "no_such" in failed["gguf"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lora", "merged"]
    with pytest.raises(ExportError, match="no_such"):
        export_all(model, tokenizer, entries, tmp_path / "strict")
