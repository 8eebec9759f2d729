"""``x * scale`` for the backward: the upstream gradient (a 0-dim device tensor) times a stored gradient.

Why a kernel: PyTorch's product with a 0-dim device tensor takes its unvectorised broadcasting path
(measured: benchmarks/RESULTS.md), and reading ``scale`` on the host instead would wait for the
whole forward.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ftengine.plugins.kernels.triton._op_registry import register_op
from ftengine.plugins.kernels.triton._utils import interpreting


@triton.jit
def _scale_kernel(x_ptr, scale_ptr, out_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    scale = tl.load(scale_ptr).to(tl.float32)
    x = tl.load(x_ptr + offs, mask=mask).to(tl.float32)
    tl.store(out_ptr + offs, (x * scale).to(out_ptr.dtype.element_ty), mask=mask)


def scaled(x: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    """``x * scale`` as ``dtype`` (``x``'s by default), in fp32; ``scale`` is a 0-dim tensor on ``x``'s device."""
    out = torch.empty(x.shape, dtype=dtype or x.dtype, device=x.device)
    if x.numel():
        block = 1024 if interpreting() else 4096
        _scale_kernel[(triton.cdiv(x.numel(), block),)](x.contiguous(), scale.reshape(()), out, x.numel(), BLOCK=block)
    return out


def _scaled_fake(x, scale, dtype):
    return torch.empty(x.shape, dtype=dtype or x.dtype, device=x.device)


scaled_op = register_op("linear_cross_entropy_scale", scaled, fake=_scaled_fake)
