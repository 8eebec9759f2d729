"""Stage 6: the exporters write the trained model, each into its own directory, atomically."""

from __future__ import annotations

import errno
import inspect
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ftengine.core import plugins
from ftengine.core.config import ExportEntry
from ftengine.core.config import export_options
from ftengine.core.errors import ExportError
from ftengine.engine import hub
from ftengine.engine.failures import disk_full
from ftengine.engine.failures import error_line
from ftengine.engine.failures import export_size_estimate
from ftengine.engine.guard import first_non_finite
from ftengine.engine.rundir import atomic_directory

log = logging.getLogger("ftengine")


def export_one(model: Any, tokenizer: Any, entry: ExportEntry, target: Path, overwrite: bool = False,
               card: dict[str, Any] | None = None, calibration: Any = None) -> list[str]:
    """One exporter writes ``target`` atomically: into a temporary sibling renamed when complete; then,
    with ``push_to_hub``, the directory is uploaded with a model card listing ``card``. ``calibration``
    (the run's training rows) goes to exporters whose ``export`` takes it.

    Raises:
        ExportError: a weight holds inf or nan (named; nothing is written), the directory cannot be
            written (permissions, a read-only file system), or the disk filled up (the path, the bytes
            free and about how many the export needs).
    """
    exporter = plugins.get("exporters", entry.format)
    options = export_options(entry)
    repo_id = (entry.model_extra or {}).get("push_to_hub")
    if repo_id:
        hub.check_push(repo_id, None, f"export {entry.format}: push_to_hub")
    bad = first_non_finite(model.named_parameters())
    if bad is not None:
        raise ExportError(f"export {entry.format}: refusing to write non-finite weights: tensor {bad} holds inf or "
                          f"nan values")
    extra = {"calibration": calibration} if "calibration" in inspect.signature(exporter.export).parameters else {}
    try:
        with atomic_directory(target, overwrite=overwrite) as staging:
            lines = exporter.export(model, tokenizer, staging, options, **extra)
    except OSError as exc:
        if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
            raise ExportError(f"export {entry.format}: cannot write into {target.parent}: {exc.strerror.lower()} "
                              f"({exc.filename or target}); choose another output directory or make it writable"
                              f"{'; the existing export there is unchanged' if target.exists() else ''}") from None
        if exc.errno != errno.ENOSPC:
            raise
        raise disk_full(exc, target, export_size_estimate(model, entry.format)) from None
    # the exporter wrote into a staging directory, renamed to ``target`` once complete
    lines = [line.replace(str(staging), str(target)) for line in lines]
    pushed = hub.push_export(target, entry, card)
    return lines + ([pushed] if pushed else [])


def export_names(entries: list[ExportEntry]) -> list[str]:
    """Directory names of the entries: the format, then ``<format>-2``, ``-3``... for repeated formats."""
    names, seen = [], {}
    for entry in entries:
        seen[entry.format] = seen.get(entry.format, 0) + 1
        names.append(entry.format if seen[entry.format] == 1 else f"{entry.format}-{seen[entry.format]}")
    return names


def export_all(model: Any, tokenizer: Any, entries: list[ExportEntry], out_root: Path, *, overwrite: bool = False,
               card: dict[str, Any] | None = None, calibration: Any = None, skip: Any = (), keep_going: bool = False,
               on_done: Callable[[str, Path], None] | None = None
               ) -> tuple[dict[str, tuple[Path, list[str]]], dict[str, str]]:
    """Every entry not in ``skip`` exported into ``out_root/<name>`` (names from :func:`export_names`),
    in order, with :func:`export_one`.

    Args:
        keep_going: a failing export is logged and listed, and the others still run (a run's exports:
            one failure never loses the rest); otherwise the first failure is raised.
        on_done: called with ``(name, path)`` as each export completes (a run records it at once, so a
            resumed run redoes only the missing ones).

    Returns:
        ``(done, failed)``: ``{name: (path, lines)}`` and ``{name: error line}``.
    """
    done: dict[str, tuple[Path, list[str]]] = {}
    failed: dict[str, str] = {}
    for name, entry in zip(export_names(entries), entries, strict=True):
        if name in skip:
            continue
        target = out_root / name
        try:
            done[name] = (target, export_one(model, tokenizer, entry, target, overwrite=overwrite, card=card,
                                             calibration=calibration))
        except Exception as exc:
            if not keep_going:
                raise
            failed[name] = error_line(exc)
            log.error("export %s failed: %s", name, failed[name])
            continue
        if on_done is not None:
            on_done(name, target)
    return done, failed
