"""GeGLU, ``gelu(gate) * up`` (exact erf or tanh approximation), forward and backward in Triton.

Exact: ``gelu(g) = g Phi(g)`` with ``Phi(g) = (1 + erf(g / sqrt 2)) / 2``, so

    d gelu/dg = Phi(g) + g exp(-g**2 / 2) / sqrt(2 pi)

Tanh: ``gelu(g) = g (1 + t) / 2`` with ``t = tanh(a (g + b g**3))``, ``a = sqrt(2 / pi)``,
``b = 0.044715``, so

    d gelu/dg = (1 + t) / 2 + g (1 - t**2) a (1 + 3 b g**2) / 2

Then ``y = gelu(g) u``, ``dg = dy u gelu'(g)``, ``du = dy gelu(g)``. As in SwiGLU, the backward
recomputes the activation from the saved ``gate`` and writes the gradients over ``gate`` and ``up``
when those are intermediates.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ftengine.plugins.kernels.triton._utils import gated_grads_may_overwrite

BLOCK = 1024
_APPROXIMATIONS = ("none", "tanh")


@triton.jit
def _tanh(x):
    # 1 - 2 / (exp(2x) + 1); |x| > 20 already rounds to +-1 in fp32, so clamp before exp
    return 1.0 - 2.0 / (tl.exp(2.0 * tl.minimum(tl.maximum(x, -20.0), 20.0)) + 1.0)


@triton.jit
def _gelu_and_grad(g, TANH: tl.constexpr):
    if TANH:
        a = 0.7978845608028654  # sqrt(2 / pi)
        b = 0.044715
        t = _tanh(a * (g + b * g * g * g))
        act = 0.5 * g * (1.0 + t)
        grad = 0.5 * (1.0 + t) + 0.5 * g * (1.0 - t * t) * a * (1.0 + 3.0 * b * g * g)
    else:
        phi = 0.5 * (1.0 + tl.erf(g * 0.7071067811865476))
        act = g * phi
        grad = phi + g * tl.exp(-0.5 * g * g) * 0.3989422804014327  # 1 / sqrt(2 pi)
    return act, grad


@triton.jit
def _geglu_fwd(g_ptr, u_ptr, y_ptr, n, BLOCK: tl.constexpr, TANH: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(u_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    act, _ = _gelu_and_grad(g, TANH)
    tl.store(y_ptr + offs, (act * u).to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _geglu_bwd(
    dy_ptr, g_ptr, u_ptr, dg_ptr, du_ptr, h_ptr, n, BLOCK: tl.constexpr, TANH: tl.constexpr, STORE_H: tl.constexpr
):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    dy = tl.load(dy_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(u_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    act, grad = _gelu_and_grad(g, TANH)
    tl.store(dg_ptr + offs, (dy * u * grad).to(dg_ptr.dtype.element_ty), mask=mask)
    tl.store(du_ptr + offs, (dy * act).to(du_ptr.dtype.element_ty), mask=mask)
    if STORE_H:
        tl.store(h_ptr + offs, (act * u).to(h_ptr.dtype.element_ty), mask=mask)


def _check(approximate: str) -> bool:
    if approximate not in _APPROXIMATIONS:
        raise ValueError(f"geglu approximate must be 'none' or 'tanh', got {approximate!r}")
    return approximate == "tanh"


def geglu_forward(gate: torch.Tensor, up: torch.Tensor, approximate: str) -> torch.Tensor:
    """``gelu(gate, approximate) * up`` for contiguous same-shape tensors, no autograd."""
    tanh = _check(approximate)
    y = torch.empty_like(gate)
    n = gate.numel()
    if n:
        _geglu_fwd[(triton.cdiv(n, BLOCK),)](gate, up, y, n, BLOCK=BLOCK, TANH=tanh, num_warps=4)
    return y


def geglu_backward(
    dy: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, dgate: torch.Tensor, dup: torch.Tensor,
    approximate: str, h: torch.Tensor | None = None,
) -> None:
    """Writes the gradients into ``dgate``/``dup`` (which may alias ``gate``/``up``), and ``h`` if given."""
    tanh = _check(approximate)
    n = gate.numel()
    if n:
        _geglu_bwd[(triton.cdiv(n, BLOCK),)](
            dy, gate, up, dgate, dup, h if h is not None else dy, n,
            BLOCK=BLOCK, TANH=tanh, STORE_H=h is not None, num_warps=4,
        )


class _GeGLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate: torch.Tensor, up: torch.Tensor, approximate: str) -> torch.Tensor:
        g, u = gate.contiguous(), up.contiguous()
        ctx.overwrite = gated_grads_may_overwrite(gate, up, g, u)
        ctx.approximate = approximate
        ctx.save_for_backward(g, u)
        return geglu_forward(g, u, approximate)

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        g, u = ctx.saved_tensors
        if ctx.overwrite:
            dg, du = g, u
        else:
            dg, du = torch.empty_like(g), torch.empty_like(u)
        geglu_backward(dy.contiguous(), g, u, dg, du, ctx.approximate)
        if ctx.overwrite:
            torch.autograd.graph.increment_version(g)
            torch.autograd.graph.increment_version(u)
        return dg, du, None


def geglu(gate: torch.Tensor, up: torch.Tensor, approximate: str = "tanh") -> torch.Tensor:
    """GeGLU gating, ``gelu(gate, approximate) * up``.

    Args:
        gate: ``(..., I)`` gate projection.
        up: ``(..., I)`` up projection, same shape and dtype.
        approximate: ``"tanh"`` or ``"none"`` (exact erf), as in ``torch.nn.functional.gelu``.

    Returns:
        ``(..., I)`` in the inputs' dtype, computed in fp32.
    """
    _check(approximate)
    return _GeGLU.apply(gate, up, approximate)
