"""The environment of a test's child process (a launched run, a torchrun worker)."""

from __future__ import annotations

import os
from pathlib import Path

ROOT = Path(__file__).parents[1]


def child_env(*first_paths: str | None, **variables: str) -> dict[str, str]:
    """This process's environment with ``first_paths`` and this checkout first on ``PYTHONPATH``, the caller's
    own ``PYTHONPATH`` kept after them (dependencies installed there stay importable), and ``variables`` set."""
    path = [p for p in (*first_paths, str(ROOT), os.environ.get("PYTHONPATH")) if p]
    return dict(os.environ, PYTHONPATH=os.pathsep.join(path), **variables)
