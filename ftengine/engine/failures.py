"""Failures turned into one line: the message the user sees and the run directory records."""

from __future__ import annotations

import errno
import shutil
from pathlib import Path
from typing import Any

from ftengine.core.errors import DiskFullError
from ftengine.core.errors import FtengineError

OUT_OF_MEMORY_HINT = ("lower training.per_device_train_batch_size or model.max_seq_length, use lora.r smaller, "
                      "quantization.load_in_4bit: true or training.gradient_checkpointing: true")


def is_out_of_memory(exc: BaseException) -> bool:
    import torch

    return isinstance(exc, (MemoryError, torch.OutOfMemoryError)) or (
        isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower())


def error_line(exc: BaseException) -> str:
    """The one-line message of ``exc`` (errors of the user's input speak for themselves; others
    carry their type)."""
    if isinstance(exc, FtengineError):
        return str(exc)
    if is_out_of_memory(exc):
        first = (str(exc).strip().splitlines() or [""])[0]
        return f"out of memory ({type(exc).__name__}: {first[:200]}); {OUT_OF_MEMORY_HINT}"
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}".rstrip(": ")


def _free_bytes(path: Path) -> int | None:
    for candidate in (path, *path.parents):
        if candidate.exists():
            return shutil.disk_usage(candidate).free
    return None


def disk_full(exc: OSError, where: Path, needed: int | None = None) -> DiskFullError:
    """A :class:`DiskFullError` for an ``ENOSPC`` raised while writing under ``where``."""
    path = Path(exc.filename) if getattr(exc, "filename", None) else where
    free = _free_bytes(where)
    need = f"; it needs about {needed:,} bytes" if needed else ""
    have = f" ({free:,} bytes free)" if free is not None else ""
    return DiskFullError(f"{path}: no space left on device{have}{need}; free some space and run again "
                         f"(what was written before is kept)")


def is_disk_full(exc: BaseException) -> bool:
    return isinstance(exc, OSError) and exc.errno == errno.ENOSPC


def export_size_estimate(model: Any, export_format: str) -> int:
    """About how many bytes an export writes: the trainable weights in float32 for an adapter, every
    weight in 16 bits otherwise (an upper bound for quantized GGUF files)."""
    params = list(model.parameters())
    if export_format == "lora":
        return sum(p.numel() * 4 for p in params if p.requires_grad)
    return sum(p.numel() * 2 for p in params)


def directory_bytes(path: Path) -> int:
    """The bytes of every file under ``path`` (0 when it does not exist)."""
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.is_dir() else 0
