"""The run directory: resolved config, status, metrics, loss curve, checkpoints and exports.

``run.json`` carries the status (``running``, ``interrupted``, ``failed``, ``completed``): a run
directory that does not say ``completed`` never looks finished. Exports are written into a
temporary sibling and renamed into place when complete; checkpoints count only once they carry
the ``COMPLETE`` marker written after every file of the checkpoint.

With several processes all of them share one run directory and only rank 0 writes to it: the
others hold a ``RunDir`` with ``writer=False``, whose writing methods do nothing.
"""

from __future__ import annotations

import json
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

CHECKPOINT_MARKER = "COMPLETE"
_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file and a rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        handle.write(text)
    os.replace(tmp, path)


@contextmanager
def atomic_directory(final: Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield an empty temporary directory beside ``final``; rename it to ``final`` on success and
    delete it on failure, so ``final`` only ever exists complete."""
    if final.exists() and not overwrite:
        raise FileExistsError(f"{final} already exists (pass --overwrite to replace it)")
    final.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}.partial-"))
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if final.exists():
        shutil.rmtree(final)
    os.replace(staging, final)


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

    def status(self) -> dict[str, Any]:
        path = self.path / "run.json"
        return json.loads(path.read_text()) if path.exists() else {}

    def set_status(self, status: str, **fields: Any) -> None:
        if not self.writer:
            return
        state = self.status()
        state.update(fields, status=status, updated=time.strftime("%Y-%m-%dT%H:%M:%S"))
        atomic_write_text(self.path / "run.json", json.dumps(state, indent=2, default=str) + "\n")

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
        if not self.metrics_path.exists():
            return []
        return [json.loads(line) for line in self.metrics_path.read_text().splitlines() if line.strip()]

    def truncate_metrics(self, last_step: int) -> None:
        """Drop logged steps after ``last_step`` (a resumed run logs them again)."""
        if not self.writer:
            return
        kept = [m for m in self.read_metrics() if m.get("step", 0) <= last_step]
        atomic_write_text(self.metrics_path, "".join(json.dumps(m) + "\n" for m in kept))

    def plot_loss(self) -> Path | None:
        """Write ``loss.png`` from ``metrics.jsonl``: the training loss, and the eval loss where there is one."""
        metrics = [m for m in self.read_metrics() if "loss" in m]
        if not metrics or not self.writer:
            return None
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        evaluations = [m for m in self.read_metrics() if "eval_loss" in m]
        fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
        ax.plot([m["step"] for m in metrics], [m["loss"] for m in metrics], marker="." if len(metrics) < 60 else None,
                label="train")
        if evaluations:
            ax.plot([m["step"] for m in evaluations], [m["eval_loss"] for m in evaluations], marker="o", label="eval")
            ax.legend()
        ax.set_xlabel("step")
        ax.set_ylabel("loss")
        ax.set_title(self.path.name)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        out = self.path / "loss.png"
        tmp = self.path / ".loss.png.partial"
        fig.savefig(tmp, format="png")
        plt.close(fig)
        os.replace(tmp, out)
        return out
