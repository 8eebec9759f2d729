"""The ``triton`` kernel backend: fused GPU ops, one per module in this package."""

from __future__ import annotations

import os

from ftengine.core.hookspecs import hookimpl


class TritonBackend:
    """Available on CUDA, and under ``TRITON_INTERPRET=1`` (the CPU interpreter, for tests)."""

    name = "triton"
    priority = 10

    def available(self) -> bool:
        try:
            import torch
            import triton  # noqa: F401
        except ImportError:
            return False
        return torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"


@hookimpl
def register_kernels(register):
    register(TritonBackend())
