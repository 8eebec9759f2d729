"""SwiGLU, ``silu(gate) * up``, forward and backward in Triton, the activation recomputed.

With ``s = sigmoid(g)``, ``silu(g) = g s`` and ``d silu/dg = s + g s (1 - s) = s (1 + g (1 - s))``:

    y  = g s u
    dg = dy u s (1 + g (1 - s))
    du = dy g s

The forward saves only ``gate`` and ``up`` (which exist anyway); the backward recomputes ``s``
and writes ``dg`` and ``du`` over the saved ``gate`` and ``up`` when those are intermediates
(:func:`can_overwrite`), so a forward plus backward allocates only the output. The fused LoRA MLP
also asks the backward for ``h = silu(g) u`` (written over ``dy``) to avoid saving it.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ftengine.plugins.kernels.triton._utils import gated_grads_may_overwrite

BLOCK = 1024


@triton.jit
def _swiglu_fwd(g_ptr, u_ptr, y_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(u_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    y = g * tl.sigmoid(g) * u
    tl.store(y_ptr + offs, y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _swiglu_bwd(dy_ptr, g_ptr, u_ptr, dg_ptr, du_ptr, h_ptr, n, BLOCK: tl.constexpr, STORE_H: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    dy = tl.load(dy_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(u_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    s = tl.sigmoid(g)
    silu = g * s
    dg = dy * u * s * (1.0 + g * (1.0 - s))
    du = dy * silu
    tl.store(dg_ptr + offs, dg.to(dg_ptr.dtype.element_ty), mask=mask)
    tl.store(du_ptr + offs, du.to(du_ptr.dtype.element_ty), mask=mask)
    if STORE_H:
        tl.store(h_ptr + offs, (silu * u).to(h_ptr.dtype.element_ty), mask=mask)


def swiglu_forward(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up`` for contiguous same-shape tensors, no autograd."""
    y = torch.empty_like(gate)
    n = gate.numel()
    if n:
        _swiglu_fwd[(triton.cdiv(n, BLOCK),)](gate, up, y, n, BLOCK=BLOCK, num_warps=4)
    return y


def swiglu_backward(
    dy: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, dgate: torch.Tensor, dup: torch.Tensor,
    h: torch.Tensor | None = None,
) -> None:
    """Writes the gradients into ``dgate``/``dup`` (which may alias ``gate``/``up``), and ``h`` if given.

    ``h`` may alias ``dy``: each element is read before it is written, by the same program.
    """
    n = gate.numel()
    if n:
        _swiglu_bwd[(triton.cdiv(n, BLOCK),)](
            dy, gate, up, dgate, dup, h if h is not None else dy, n, BLOCK=BLOCK, STORE_H=h is not None, num_warps=4
        )


class _SwiGLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        g, u = gate.contiguous(), up.contiguous()
        ctx.overwrite = gated_grads_may_overwrite(gate, up, g, u)
        ctx.save_for_backward(g, u)
        return swiglu_forward(g, u)

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        g, u = ctx.saved_tensors
        if ctx.overwrite:
            dg, du = g, u
        else:
            dg, du = torch.empty_like(g), torch.empty_like(u)
        swiglu_backward(dy.contiguous(), g, u, dg, du)
        if ctx.overwrite:
            torch.autograd.graph.increment_version(g)
            torch.autograd.graph.increment_version(u)
        return dg, du


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """SwiGLU gating, ``silu(gate) * up``.

    Args:
        gate: ``(..., I)`` gate projection.
        up: ``(..., I)`` up projection, same shape and dtype.

    Returns:
        ``(..., I)`` in the inputs' dtype, computed in fp32.
    """
    return _SwiGLU.apply(gate, up)
