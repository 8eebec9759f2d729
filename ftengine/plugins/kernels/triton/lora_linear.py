"""LoRA linear layer fused with its frozen base weight (16-bit, or NF4 dequantized on the fly).

    y  = x W^T + b + s (x A^T) B^T                  W (out, in), A (r, in), B (out, r)

With ``xa = x A^T`` (N, r) and upstream ``dy`` (N, out):

    dx = dy W + s (dy B) A
    dB = s dy^T xa
    dA = s (dy B)^T x
    db = sum_rows dy

``W + s B A`` is never formed. The forward saves ``x`` when A is trained and recomputes the
r-wide ``xa`` from it in the backward (a GEMM of ``r`` columns, a few microseconds), so a layer
keeps no activation beyond its input; only with A frozen and B trained is ``xa`` saved instead.
The base weight is a parameter (NF4 stays packed and is
dequantized again in the backward). GEMMs are cuBLAS; the NF4 unpacking is the Triton kernel of
:mod:`.dequantize_nf4`. Helpers here are shared with the fused MLP and QKV ops.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.utils.weak import WeakTensorKeyDictionary

from ftengine.core.kernels import forward_generation
from ftengine.plugins.kernels.triton.dequantize_nf4 import dequantize_nf4

# per-forward derived tensors, keyed weakly by the adapter tensor they come from: (validity key, tensor)
_COPIES = WeakTensorKeyDictionary()  # one adapter weight in the compute dtype
_STACKS = WeakTensorKeyDictionary()  # several A's concatenated (keyed by the first), in the compute dtype


def _cached(cache: WeakTensorKeyDictionary, tensors: list[torch.Tensor], dtype: torch.dtype,
            make: Any) -> torch.Tensor:
    """``make()``, reused while the forward, every tensor's version and storage and ``dtype`` are unchanged."""
    key = (forward_generation(), dtype, *((t._version, t.data_ptr()) for t in tensors))
    hit = cache.get(tensors[0])
    if hit is None or hit[0] != key:
        hit = (key, make())
        cache[tensors[0]] = hit
    return hit[1]


def compute_copy(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``t`` (an adapter weight, e.g. fp32) in the compute ``dtype``, cast once per model forward.

    A LoRA step would otherwise cast each A and B again in the forward, the recomputation and
    the backward: hundreds of small kernels a step. The copy is reused while the forward
    (:func:`~ftengine.core.kernels.begin_forward`), the tensor's version and its storage are
    unchanged, so an optimizer step or a reload always gives a fresh one.
    """
    if t.dtype == dtype:
        return t
    return _cached(_COPIES, [t], dtype, lambda: t.detach().to(dtype))


def stacked_copy(tensors: list[torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
    """``torch.cat(tensors)`` in ``dtype``, cached like :func:`compute_copy`."""
    return _cached(_STACKS, tensors, dtype, lambda: torch.cat([t.detach().to(dtype) for t in tensors]))


def base_weight(weight: torch.Tensor, quant_state: Any, dtype: torch.dtype) -> torch.Tensor:
    """The frozen ``(out, in)`` base weight in ``dtype``, unpacked from NF4 when ``quant_state`` is set."""
    if quant_state is not None:
        weight = dequantize_nf4(weight, quant_state)
    return weight if weight.dtype == dtype else weight.to(dtype)


def check_frozen(*weights: torch.Tensor) -> None:
    """The fused LoRA ops give base weights no gradient: refuse a trainable one rather than drop it."""
    for w in weights:
        if w.requires_grad and torch.is_grad_enabled():
            raise ValueError("fused LoRA ops keep the base weight frozen; it requires grad (use lora_a / lora_b)")


def forward_projection(
    x2: torch.Tensor, weight: torch.Tensor, quant_state: Any, bias: torch.Tensor | None,
    lora_a: torch.Tensor | None, lora_b: torch.Tensor | None, scaling: float,
    xa: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``y = x W^T + b + s (x A^T) B^T`` for ``x2`` (N, in); returns ``(y, xa)``.

    ``xa`` may be passed in precomputed (the QKV op computes the three at once).
    """
    w = base_weight(weight, quant_state, x2.dtype)
    if bias is not None:
        y = torch.addmm(bias.to(x2.dtype), x2, w.t())  # (N, out)
    else:
        y = x2 @ w.t()
    del w
    if lora_a is None or lora_b is None:
        return y, None
    if xa is None:
        xa = x2 @ compute_copy(lora_a, x2.dtype).t()  # (N, r)
    y.addmm_(xa, compute_copy(lora_b, x2.dtype).t(), alpha=scaling)
    return y, xa


def saved_adapter_inputs(
    x2: torch.Tensor, xa: torch.Tensor | None, need_da: bool, need_db: bool
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """What an adapter keeps for its backward: ``x`` if ``dA`` needs it (``xa`` is then recomputed), else ``xa``."""
    if need_da:
        return x2, None
    return None, xa if need_db else None


def adapter_grads(
    dy: torch.Tensor, x2: torch.Tensor | None, xa: torch.Tensor | None, lora_a: torch.Tensor, lora_b: torch.Tensor,
    scaling: float, need_da: bool, need_db: bool, need_dya: bool,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """``(dA, dB, s dy B)`` for one adapter; ``s dy B`` (N, r) feeds ``dx`` through ``A``.

    ``xa`` None: recomputed as ``x2 A^T`` if ``dB`` needs it.
    """
    dtype = dy.dtype
    if need_db and xa is None:
        xa = x2 @ compute_copy(lora_a, dtype).t()  # (N, r)
    db = (dy.t() @ xa).mul_(scaling).to(lora_b.dtype) if need_db else None  # (out, r)
    dya = None
    if need_da or need_dya:
        dya = (dy @ compute_copy(lora_b, dtype)).mul_(scaling)  # (N, r)
    da = (dya.t() @ x2).to(lora_a.dtype) if need_da else None  # (r, in)
    return da, db, dya


def add_input_grad(
    dx: torch.Tensor | None, dy: torch.Tensor, weight: torch.Tensor, quant_state: Any,
    lora_a: torch.Tensor | None, dya: torch.Tensor | None,
) -> torch.Tensor:
    """``dx += dy W + dya A`` (``dya`` already carries the scaling); allocates ``dx`` when None."""
    w = base_weight(weight, quant_state, dy.dtype)
    if dx is None:
        dx = dy @ w  # (N, in)
    else:
        dx.addmm_(dy, w)
    del w
    if dya is not None and lora_a is not None:
        dx.addmm_(dya, compute_copy(lora_a, dy.dtype))
    return dx


def bias_grad(dy: torch.Tensor, bias: torch.Tensor | None, needed: bool) -> torch.Tensor | None:
    """``sum_rows dy`` in the bias dtype, when there is a bias that needs it."""
    return dy.sum(0).to(bias.dtype) if needed and bias is not None else None


class _LoRALinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, lora_a, lora_b, bias, scaling, quant_state):
        x2 = x.reshape(-1, x.shape[-1])  # (N, in)
        has_adapter = lora_a is not None and lora_b is not None
        y, xa = forward_projection(x2, weight, quant_state, bias, lora_a, lora_b, scaling)
        need_da = has_adapter and ctx.needs_input_grad[2]
        need_db = has_adapter and ctx.needs_input_grad[3]
        ctx.save_for_backward(*saved_adapter_inputs(x2, xa, need_da, need_db), weight, lora_a, lora_b, bias)
        ctx.scaling, ctx.quant_state, ctx.has_adapter = scaling, quant_state, has_adapter
        ctx.in_shape = x.shape
        return y.reshape(*x.shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, dy):
        x2, xa, weight, lora_a, lora_b, bias = ctx.saved_tensors
        need_dx, _, need_da, need_db, need_dbias = ctx.needs_input_grad[:5]
        dy2 = dy.reshape(-1, dy.shape[-1])  # (N, out)
        da = db = dya = None
        if ctx.has_adapter:
            da, db, dya = adapter_grads(dy2, x2, xa, lora_a, lora_b, ctx.scaling, need_da, need_db, need_dx)
        dx = None
        if need_dx:
            dx = add_input_grad(None, dy2, weight, ctx.quant_state, lora_a, dya).reshape(ctx.in_shape)
        return dx, None, da, db, bias_grad(dy2, bias, need_dbias), None, None


def lora_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    lora_a: torch.Tensor | None,
    lora_b: torch.Tensor | None,
    scaling: float,
    bias: torch.Tensor | None = None,
    quant_state: Any = None,
) -> torch.Tensor:
    """A frozen linear layer plus its LoRA update, ``x W^T + b + s (x A^T) B^T``.

    Args:
        x: ``(..., in)`` input.
        weight: frozen ``(out, in)`` base weight, or bitsandbytes-packed NF4 with ``quant_state``.
        lora_a: ``(r, in)`` or None (no adapter).
        lora_b: ``(out, r)`` or None.
        scaling: the LoRA scale ``s``.
        bias: optional ``(out,)``.
        quant_state: bitsandbytes ``QuantState`` when ``weight`` is NF4.

    Returns:
        ``(..., out)`` in ``x.dtype``.

    Raises:
        ValueError: the base weight requires grad.
    """
    check_frozen(weight)
    return _LoRALinear.apply(x, weight, lora_a, lora_b, bias, float(scaling), quant_state)
