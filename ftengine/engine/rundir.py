"""The run directory: resolved config, status, metrics, loss curve, checkpoints and exports.

``run.json`` carries the status (``running``, ``interrupted``, ``failed``, ``exports_failed``,
``completed``): a run directory that does not say ``completed`` never looks finished. A process
trains or exports in it only while holding its lock (``run.lock``), so a ``running`` status with
no lock held is a killed run and reads ``interrupted``. Exports are written into a
temporary sibling and renamed into place when complete; checkpoints count only once they carry
the ``COMPLETE`` marker written after every file of the checkpoint.

With several processes all of them share one run directory and only rank 0 writes to it: the
others hold a ``RunDir`` with ``writer=False``, whose writing methods do nothing.
"""

from __future__ import annotations

import errno
import fcntl
import json
import math
import os
import re
import shutil
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from ftengine.core.errors import FtengineError
from ftengine.core.errors import RunLockedError

CHECKPOINT_MARKER = "COMPLETE"
LOCK_FILE = "run.lock"
_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")
_TEMP_FILE = ".tmp-"
_STAGING = ".partial-"
_ASIDE = ".old-"


def umask() -> int:
    """The process's umask (read without changing it for good)."""
    mask = os.umask(0o22)
    os.umask(mask)
    return mask


def finite_or_none(value: Any) -> Any:
    """``None`` for a non-finite float (JSON has no NaN or Infinity), the value otherwise."""
    return None if isinstance(value, float) and not math.isfinite(value) else value


def strict_json(value: Any, **kwargs: Any) -> str:
    """JSON text without ``NaN``/``Infinity`` literals: non-finite floats become ``null``."""
    def clean(item: Any) -> Any:
        if isinstance(item, dict):
            return {k: clean(v) for k, v in item.items()}
        if isinstance(item, (list, tuple)):
            return [clean(v) for v in item]
        return finite_or_none(item)

    return json.dumps(clean(value), allow_nan=False, default=str, **kwargs)


def append_jsonl(path: Path, record: dict[str, Any]) -> None:
    """Append one strict-JSON line; a torn last line left by a killed writer is ended first, so it
    stays one unreadable line instead of corrupting this record."""
    with path.open("ab") as handle:
        if handle.tell() > 0:
            with path.open("rb") as reader:
                reader.seek(-1, os.SEEK_END)
                if reader.read(1) != b"\n":
                    handle.write(b"\n")
        handle.write((strict_json(record) + "\n").encode("utf-8"))


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file and a rename (mode from the umask)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}{_TEMP_FILE}")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
        os.chmod(tmp, 0o666 & ~umask())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@contextmanager
def atomic_directory(final: Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield an empty temporary directory beside ``final``; rename it to ``final`` on success and
    delete it on failure, so ``final`` only ever exists complete. With ``overwrite`` the old
    ``final`` is moved aside, and deleted only once the new one is in its place."""
    if final.exists() and not overwrite:
        raise FileExistsError(f"{final} already exists (pass --overwrite to replace it)")
    final.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}{_STAGING}"))
    os.chmod(staging, 0o777 & ~umask())
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    aside = None
    if final.exists():
        aside = final.parent / f".{final.name}{_ASIDE}{os.getpid()}"
        os.replace(final, aside)
    os.replace(staging, final)
    if aside is not None:
        shutil.rmtree(aside, ignore_errors=True)


def remove_leftovers(directory: Path) -> list[str]:
    """Remove what killed writers left in ``directory``: staging directories and temporary files.
    An old export moved aside whose replacement never arrived is put back. Returns what was done."""
    done: list[str] = []
    if not directory.is_dir():
        return done
    for child in sorted(directory.iterdir()):
        name = child.name
        if not name.startswith("."):
            continue
        if _ASIDE in name:
            final = directory / name[1:].split(_ASIDE)[0]
            if final.exists():
                shutil.rmtree(child, ignore_errors=True)
                done.append(f"removed {child}")
            else:
                os.replace(child, final)
                done.append(f"restored {final}")
        elif _STAGING in name:
            shutil.rmtree(child, ignore_errors=True)
            done.append(f"removed {child}")
        elif _TEMP_FILE in name and child.is_file():
            child.unlink(missing_ok=True)
            done.append(f"removed {child}")
    return done


class RunDir:
    """One run's directory (``writer=False``: read it, never write; the other ranks of a job)."""

    def __init__(self, path: Path, writer: bool = True):
        self.path = Path(path)
        self.writer = writer

    def write_text(self, name: str, text: str) -> None:
        """Write a file of the run directory atomically (rank 0 only)."""
        if self.writer:
            atomic_write_text(self.path / name, text)

    @classmethod
    def create(cls, parent: str | Path, name: str) -> RunDir:
        stamp = time.strftime("%Y%m%d-%H%M%S")
        path = Path(parent) / f"{name}-{stamp}"
        suffix = 1
        while path.exists():
            suffix += 1
            path = Path(parent) / f"{name}-{stamp}-{suffix}"
        path.mkdir(parents=True)
        return cls(path)

    @property
    def config_path(self) -> Path:
        return self.path / "config.yaml"

    @property
    def metrics_path(self) -> Path:
        return self.path / "metrics.jsonl"

    @property
    def checkpoints(self) -> Path:
        return self.path / "checkpoints"

    @property
    def exports(self) -> Path:
        return self.path / "exports"

    def _recorded_status(self) -> dict[str, Any]:
        path = self.path / "run.json"
        return json.loads(path.read_text()) if path.exists() else {}

    def status(self) -> dict[str, Any]:
        """``run.json``; a ``running`` status whose process is gone (no one holds the lock) reads
        ``interrupted``."""
        state = self._recorded_status()
        if state.get("status") == "running" and not self.is_locked():
            state.update(status="interrupted", error="the process running it stopped without finishing")
        return state

    def set_status(self, status: str, **fields: Any) -> None:
        if not self.writer:
            return
        state = self._recorded_status()
        state.update(fields, status=status, updated=time.strftime("%Y-%m-%dT%H:%M:%S"))
        atomic_write_text(self.path / "run.json", strict_json(state, indent=2) + "\n")

    @contextmanager
    def lock(self, what: str = "training") -> Iterator[None]:
        """Hold the run directory for this process (``fcntl.flock`` on ``run.lock``), so no second
        process trains or exports into it at the same time; the kernel releases it if we die.

        Raises:
            RunLockedError: another process holds it (its pid and what it does are named).
        """
        if not self.writer:  # another rank of this job: rank 0 holds the lock for all of them
            yield
            return
        self.path.mkdir(parents=True, exist_ok=True)
        handle = open(self.path / LOCK_FILE, "a+", encoding="utf-8")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            handle.close()
            if exc.errno not in (errno.EAGAIN, errno.EACCES):
                raise
            raise RunLockedError(f"{self.path}: in use by {holder}; wait for it to finish or stop it first") from None
        try:
            handle.seek(0)
            handle.truncate()
            handle.write(f"pid {os.getpid()} ({what})\n")
            handle.flush()
            for parent in (self.path, self.exports):
                remove_leftovers(parent)
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
            handle.close()

    def is_locked(self) -> bool:
        """Whether some open lock on the run directory is held (by any process, this one included)."""
        path = self.path / LOCK_FILE
        if not path.exists():
            return False
        with open(path, "a+", encoding="utf-8") as handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                return True
            fcntl.flock(handle, fcntl.LOCK_UN)
            return False

    def latest_checkpoint(self) -> Path | None:
        """The newest checkpoint whose files were all written."""
        if not self.checkpoints.is_dir():
            return None
        complete = []
        for child in self.checkpoints.iterdir():
            match = _CHECKPOINT.match(child.name)
            if match and (child / CHECKPOINT_MARKER).exists():
                complete.append((int(match.group(1)), child))
        return max(complete)[1] if complete else None

    def resume_point(self) -> Path:
        """The checkpoint a resumed run continues from (the newest complete one); the metrics logged
        after its step are dropped, since the resumed run logs those steps again.

        Raises:
            FtengineError: the run has no complete checkpoint.
        """
        checkpoint = self.latest_checkpoint()
        if checkpoint is None:
            raise FtengineError(f"{self.path}: no complete checkpoint to resume from")
        self.truncate_metrics(int(_CHECKPOINT.match(checkpoint.name).group(1)))
        return checkpoint

    def read_metrics(self) -> list[dict[str, Any]]:
        """The logged records; a line torn by a killed writer is left out."""
        if not self.metrics_path.exists():
            return []
        records = []
        for line in self.metrics_path.read_text(encoding="utf-8", errors="replace").splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if isinstance(record, dict):
                records.append(record)
        return records

    def truncate_metrics(self, last_step: int) -> None:
        """Drop logged steps after ``last_step`` (a resumed run logs them again)."""
        if not self.writer:
            return
        kept = [m for m in self.read_metrics() if m.get("step", 0) <= last_step]
        atomic_write_text(self.metrics_path, "".join(strict_json(m) + "\n" for m in kept))

    def plot_loss(self) -> Path | None:
        """Write ``loss.png`` from ``metrics.jsonl``: the loss, and for RL runs the reward, KL and
        completion length (:mod:`ftengine.engine.loss_plot`)."""
        if not self.writer:
            return None
        from ftengine.engine.loss_plot import write_plot

        return write_plot(self.read_metrics(), self.path / "loss.png", self.path / f".loss.png{_TEMP_FILE}plot",
                          self.path.name)
