"""Fault injection for the reliability tests: run a function in a forked child that dies like
``kill -9`` (``os._exit``, no cleanup) or sees ``ENOSPC`` at the N-th write under a directory.

Writes are seen through Python's audit events (``open`` for writing, ``os.rename``/``os.replace``),
so every writer counts (ours, transformers', peft's, torch.save's) without a hook in the package.
``FTENGINE_FAULT_AT=N`` and ``FTENGINE_FAULT=kill|enospc`` select the fault in the child.
"""

from __future__ import annotations

import errno
import json
import os
import signal
import sys
import time
from pathlib import Path

import torch

KILLED = 137

_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC


def _is_write(event: str, args: tuple) -> str | None:
    """The path written by an audit event, or None for a read or an unrelated event."""
    if event == "open":
        path, mode, flags = args
        writing = (isinstance(mode, str) and any(c in mode for c in "wax+")) or (
            mode is None and isinstance(flags, int) and flags & _WRITE_FLAGS)
        return str(path) if writing and isinstance(path, (str, bytes, os.PathLike)) else None
    if event in ("os.rename", "os.replace"):
        return str(args[1])
    if event == "os.mkdir":
        return str(args[0])
    return None


def in_child(func, root: Path, fault: str, at: int, log: Path, timeout: float = 300) -> int:
    """Run ``func()`` in a forked child; the ``at``-th write under ``root`` (1-based; 0 = none)
    kills it or raises ENOSPC. Each write seen is appended to ``log`` (one JSON line) first.
    Returns the child's exit status (0 ok, 1 exception, 137 killed); a child still running after
    ``timeout`` seconds is killed and raises ``TimeoutError``."""
    pid = os.fork()
    if pid == 0:  # the child
        status = 1
        try:
            # The parent's OpenMP thread team does not exist here: one thread keeps torch out of it.
            torch.set_num_threads(1)
            os.environ["FTENGINE_FAULT"], os.environ["FTENGINE_FAULT_AT"] = fault, str(at)
            seen = [0]
            prefix = str(root)

            def hook(event: str, args: tuple) -> None:
                path = _is_write(event, args)
                if path is None or not path.startswith(prefix) or path.startswith(str(log)):
                    return
                seen[0] += 1
                with open(log, "a") as handle:  # noqa: PTH123 - under the log's own prefix, not counted
                    handle.write(json.dumps({"n": seen[0], "event": event, "path": path}) + "\n")
                if seen[0] == at:
                    if fault == "kill":
                        os._exit(KILLED)
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)

            sys.addaudithook(hook)
            func()
            status = 0
        except BaseException as exc:  # noqa: BLE001 - the child reports through its status and the log
            with open(str(log) + ".error", "w") as handle:  # noqa: PTH123
                handle.write(f"{type(exc).__name__}: {exc}")
        finally:
            os._exit(status)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        done, code = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(code)
        time.sleep(0.1)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    raise TimeoutError(f"the child process did not finish in {timeout} s")


def writes(log: Path) -> list[dict]:
    """The writes a child recorded."""
    return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
