"""Rotary position embedding (Hugging Face rotate-half convention), forward and backward in Triton.

With ``x = [x1, x2]`` split into halves along the head dim and ``c = [c1, c2]``, ``s = [s1, s2]``
likewise, ``rotate_half(x) = [-x2, x1]`` and ``out = x c + rotate_half(x) s``:

    out1 = x1 c1 - x2 s1
    out2 = x2 c2 + x1 s2

The map is linear in x, so the backward is its transpose:

    dx1 = do1 c1 + do2 s2
    dx2 = do2 c2 - do1 s1

One program per (batch, position) rotates every q head and every k head there, loading its cos
and sin rows once. Inputs are read through their strides (q from ``view(B, T, H, D).transpose``
needs no copy) and outputs keep the inputs' layout. cos and sin get no gradient.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ftengine.plugins.kernels.triton._op_registry import register_op
from ftengine.plugins.kernels.triton._utils import next_power_of_2

# warps per program; 0 picks by the number of q elements per position
NUM_WARPS = 0


@triton.jit
def _rotate_heads(
    x_ptr, o_ptr, b, t, n_heads, half, sxb, sxh, sxt, sxd, sob, soh, sot, sod, c1, c2, s1, s2,
    BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr, BACKWARD: tl.constexpr,
):
    h = tl.arange(0, BLOCK_H)[:, None]
    d = tl.arange(0, BLOCK_D)[None, :]
    mask = (h < n_heads) & (d < half)
    x_base = x_ptr + b * sxb + t * sxt + h * sxh
    o_base = o_ptr + b * sob + t * sot + h * soh
    x1 = tl.load(x_base + d * sxd, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(x_base + (d + half) * sxd, mask=mask, other=0.0).to(tl.float32)
    if BACKWARD:
        o1 = x1 * c1 + x2 * s2
        o2 = x2 * c2 - x1 * s1
    else:
        o1 = x1 * c1 - x2 * s1
        o2 = x2 * c2 + x1 * s2
    tl.store(o_base + d * sod, o1.to(o_ptr.dtype.element_ty), mask=mask)
    tl.store(o_base + (d + half) * sod, o2.to(o_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _rope_kernel(
    q_ptr, k_ptr, qo_ptr, ko_ptr, cos_ptr, sin_ptr, seq_len, n_q_heads, n_k_heads, half,
    sqb, sqh, sqt, sqd, skb, skh, skt, skd,
    sqob, sqoh, sqot, sqod, skob, skoh, skot, skod,
    scb, sct, scd, ssb, sst, ssd,
    BLOCK_HQ: tl.constexpr, BLOCK_HK: tl.constexpr, BLOCK_D: tl.constexpr, BACKWARD: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    b = pid // seq_len
    t = pid % seq_len
    d = tl.arange(0, BLOCK_D)[None, :]
    dmask = d < half
    c_base = cos_ptr + b * scb + t * sct
    s_base = sin_ptr + b * ssb + t * sst
    c1 = tl.load(c_base + d * scd, mask=dmask, other=0.0).to(tl.float32)
    c2 = tl.load(c_base + (d + half) * scd, mask=dmask, other=0.0).to(tl.float32)
    s1 = tl.load(s_base + d * ssd, mask=dmask, other=0.0).to(tl.float32)
    s2 = tl.load(s_base + (d + half) * ssd, mask=dmask, other=0.0).to(tl.float32)
    _rotate_heads(q_ptr, qo_ptr, b, t, n_q_heads, half, sqb, sqh, sqt, sqd, sqob, sqoh, sqot, sqod,
                  c1, c2, s1, s2, BLOCK_HQ, BLOCK_D, BACKWARD)
    _rotate_heads(k_ptr, ko_ptr, b, t, n_k_heads, half, skb, skh, skt, skd, skob, skoh, skot, skod,
                  c1, c2, s1, s2, BLOCK_HK, BLOCK_D, BACKWARD)


def _launch(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, backward: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotated ``q`` and ``k`` in their layouts (the inverse rotation with ``backward``); no autograd."""
    batch, n_q, seq, dim = q.shape
    n_k = k.shape[1]
    qo, ko = torch.empty_like(q), torch.empty_like(k)
    if q.numel() == 0:
        return qo, ko
    half = dim // 2
    block_d = next_power_of_2(half)
    num_warps = NUM_WARPS or (4 if n_q * dim <= 4096 else 8)
    _rope_kernel[(batch * seq,)](
        q, k, qo, ko, cos, sin, seq, n_q, n_k, half,
        *q.stride(), *k.stride(), *qo.stride(), *ko.stride(), *cos.stride(), *sin.stride(),
        BLOCK_HQ=next_power_of_2(n_q), BLOCK_HK=next_power_of_2(n_k), BLOCK_D=block_d, BACKWARD=backward,
        num_warps=num_warps,
    )
    return qo, ko


_rotate_op = register_op(
    "rope_rotate", _launch, fake=lambda q, k, cos, sin, backward: (torch.empty_like(q), torch.empty_like(k))
)


def _expand(table: torch.Tensor, batch: int, seq: int, dim: int) -> torch.Tensor:
    if table.dim() == 2:  # (T, D)
        table = table.unsqueeze(0)
    return table.expand(batch, seq, dim)  # (B, T, D), stride 0 over a broadcast batch


class _Rope(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        ctx.save_for_backward(cos, sin)
        return _rotate_op(q, k, cos, sin, False)

    @staticmethod
    def backward(ctx, dq_out: torch.Tensor, dk_out: torch.Tensor):
        cos, sin = ctx.saved_tensors
        dq, dk = _rotate_op(dq_out, dk_out, cos, sin, True)
        return dq, dk, None, None


def rope(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Apply rotary embeddings to queries and keys.

    Args:
        q: ``(B, Hq, T, D)`` queries, any strides.
        k: ``(B, Hk, T, D)`` keys (``Hk`` may be fewer than ``Hq``: GQA).
        cos: ``(B, T, D)`` or ``(T, D)`` (a batch of 1 broadcasts).
        sin: same shape as ``cos``.

    Returns:
        ``(q_out, k_out)`` with the shapes, dtypes and layouts of ``q`` and ``k``.
    """
    if q.dim() != 4 or k.dim() != 4 or q.shape[-1] % 2 or k.shape[-1] != q.shape[-1]:
        raise ValueError(f"rope expects q (B, Hq, T, D) and k (B, Hk, T, D) with even D, got {q.shape}, {k.shape}")
    batch, _, seq, dim = q.shape
    if k.shape[0] != batch or k.shape[2] != seq:
        raise ValueError(f"rope: q {tuple(q.shape)} and k {tuple(k.shape)} differ in batch or length")
    return _Rope.apply(q, k, _expand(cos, batch, seq, dim), _expand(sin, batch, seq, dim))
