"""The ``triton`` kernel backend: fused GPU ops, one per module in this package."""

from __future__ import annotations

import os

from ftengine.core.hookspecs import hookimpl


class TritonBackend:
    """Available on CUDA, and under ``TRITON_INTERPRET=1`` (the CPU interpreter, for tests).

    The ops are imported on first use, so registering the backend costs no Triton import.
    """

    name = "triton"
    priority = 10
    _modules = {
        "rms_norm": "rms_norm",
        "rope": "rope",
        "swiglu": "swiglu",
        "geglu": "geglu",
        "linear_cross_entropy": "linear_cross_entropy",
        "token_logprobs": "token_logprobs",
        "lora_linear": "lora_linear",
        "lora_mlp": "lora_mlp",
        "lora_qkv": "lora_qkv",
        "lora_moe": "lora_moe",
        "dequantize_nf4": "dequantize_nf4",
    }

    def available(self) -> bool:
        try:
            import torch
            import triton  # noqa: F401
        except ImportError:
            return False
        return torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"

    def __getattr__(self, name: str):
        module = type(self)._modules.get(name)
        if module is None:
            raise AttributeError(name)
        import importlib

        return getattr(importlib.import_module(f"{__name__}.{module}"), name)


@hookimpl
def register_kernels(register):
    register(TritonBackend())
