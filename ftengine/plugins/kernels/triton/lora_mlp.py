"""Gated MLP with LoRA on gate, up and down, fused with the frozen base weights.

    g = lora(x; gate)   u = lora(x; up)   h = act(g, u)   y = lora(h; down)

act is SwiGLU or GeGLU (:mod:`.swiglu`, :mod:`.geglu`). Saved for the backward: ``g``, ``u``
and, when a gate or up adapter's A is trained, ``x``; ``h`` (N, I) and the r-wide ``x A^T``,
``h A_d^T`` are not saved but recomputed. Backward, with the LoRA-linear rules of
:mod:`.lora_linear` for each projection:

    dh      = dy W_d + s_d (dy B_d) A_d
    dg, du  = act'(g, u) dh                    (one Triton pass that also rebuilds h)
    dA_d    = s_d (dy B_d)^T h,  dB_d = s_d dy^T (h A_d^T)
    dx      = dg W_g + s_g (dg B_g) A_g + du W_u + s_u (du B_u) A_u

The activation backward writes ``h`` over ``dh``, ``dg`` over ``g`` and ``du`` over ``u``: the
backward adds no (N, I) buffer beyond ``dh``, which is why it can run only once.
"""

from __future__ import annotations

import torch

from ftengine.core.kernels import LoRAWeights
from ftengine.plugins.kernels.triton.geglu import geglu_backward
from ftengine.plugins.kernels.triton.geglu import geglu_forward
from ftengine.plugins.kernels.triton.lora_linear import adapter_grads
from ftengine.plugins.kernels.triton.lora_linear import add_input_grad
from ftengine.plugins.kernels.triton.lora_linear import bias_grad
from ftengine.plugins.kernels.triton.lora_linear import check_frozen
from ftengine.plugins.kernels.triton.lora_linear import compute_copy
from ftengine.plugins.kernels.triton.lora_linear import forward_projection
from ftengine.plugins.kernels.triton.lora_linear import saved_adapter_inputs
from ftengine.plugins.kernels.triton.swiglu import swiglu_backward
from ftengine.plugins.kernels.triton.swiglu import swiglu_forward

ACTIVATIONS = ("swiglu", "geglu", "geglu_tanh")


def _act_forward(g: torch.Tensor, u: torch.Tensor, activation: str) -> torch.Tensor:
    if activation == "swiglu":
        return swiglu_forward(g, u)
    return geglu_forward(g, u, "tanh" if activation == "geglu_tanh" else "none")


def _act_backward(dh: torch.Tensor, g: torch.Tensor, u: torch.Tensor, activation: str) -> None:
    """In place: ``h`` over ``dh``, ``dg`` over ``g``, ``du`` over ``u``."""
    if activation == "swiglu":
        swiglu_backward(dh, g, u, g, u, h=dh)
    else:
        geglu_backward(dh, g, u, g, u, "tanh" if activation == "geglu_tanh" else "none", h=dh)


def _has_adapter(a, b) -> bool:
    return a is not None and b is not None


class _LoRAMLP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, activation, scalings, quant_states, *params):
        # params: (weight, lora_a, lora_b, bias) for gate, up, down
        pg, pu, pd = params[0:4], params[4:8], params[8:12]
        sg, su, sd = scalings
        qg, qu, qd = quant_states
        x2 = x.reshape(-1, x.shape[-1])  # (N, H)
        g, xa_g = forward_projection(x2, pg[0], qg, pg[3], pg[1], pg[2], sg)  # (N, I), (N, r)
        u, xa_u = forward_projection(x2, pu[0], qu, pu[3], pu[1], pu[2], su)
        h = _act_forward(g, u, activation)  # (N, I), not saved
        y, _ = forward_projection(h, pd[0], qd, pd[3], pd[1], pd[2], sd)  # (N, H), (N, r)
        del h
        needs = ctx.needs_input_grad  # per layer (weight, lora_a, lora_b, bias): gate 4..7, up 8..11, down 12..15
        x_kept, xa_g = saved_adapter_inputs(x2, xa_g, needs[5] or needs[9], needs[6])
        xa_u = saved_adapter_inputs(x2, xa_u, needs[5] or needs[9], needs[10])[1]
        ctx.save_for_backward(x_kept, g, u, xa_g, xa_u, *params)
        ctx.activation, ctx.scalings, ctx.quant_states = activation, scalings, quant_states
        ctx.in_shape = x.shape
        ctx.consumed = False
        return y.reshape(*x.shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, dy):
        if ctx.consumed:
            raise RuntimeError("lora_mlp's backward reuses its saved activations in place and runs only once")
        ctx.consumed = True
        x2, g, u, xa_g, xa_u, *params = ctx.saved_tensors
        pg, pu, pd = params[0:4], params[4:8], params[8:12]
        sg, su, sd = ctx.scalings
        qg, qu, qd = ctx.quant_states
        needs = ctx.needs_input_grad
        ng, nu, nd = needs[4:8], needs[8:12], needs[12:16]  # per layer: (weight, lora_a, lora_b, bias)
        dy2 = dy.reshape(-1, dy.shape[-1])  # (N, H)

        # down projection: dh = dy W_d + s_d (dy B_d) A_d
        has_d = _has_adapter(pd[1], pd[2])
        dya_d = (dy2 @ compute_copy(pd[2], dy2.dtype)).mul_(sd) if has_d else None  # (N, r)
        dh = add_input_grad(None, dy2, pd[0], qd, pd[1], dya_d)  # (N, I)
        dbias_d = bias_grad(dy2, pd[3], nd[3])
        _act_backward(dh, g, u, ctx.activation)
        h, dg, du = dh, g, u
        da_d = (dya_d.t() @ h).to(pd[1].dtype) if has_d and nd[1] else None  # (r, I)
        db_d = adapter_grads(dy2, h, None, pd[1], pd[2], sd, False, True, False)[1] if has_d and nd[2] else None
        del h, dh

        grads = []
        dx = None
        for dz, xa, p, q, s, n in ((dg, xa_g, pg, qg, sg, ng), (du, xa_u, pu, qu, su, nu)):
            da = db = dya = None
            if _has_adapter(p[1], p[2]):
                da, db, dya = adapter_grads(dz, x2, xa, p[1], p[2], s, n[1], n[2], needs[0])
            if needs[0]:
                dx = add_input_grad(dx, dz, p[0], q, p[1], dya)
            grads += [None, da, db, bias_grad(dz, p[3], n[3])]
        grads += [None, da_d, db_d, dbias_d]
        dx = dx.reshape(ctx.in_shape) if dx is not None else None
        return (dx, None, None, None, *grads)


def _params(layer: LoRAWeights) -> tuple:
    return (layer.weight, layer.lora_a, layer.lora_b, layer.bias)


def lora_mlp(
    x: torch.Tensor, gate: LoRAWeights, up: LoRAWeights, down: LoRAWeights, activation: str = "swiglu"
) -> torch.Tensor:
    """``down(act(gate(x), up(x)))`` with each projection a frozen base plus its LoRA adapter.

    Args:
        x: ``(..., H)`` input.
        gate: ``(I, H)`` projection and adapter.
        up: ``(I, H)`` projection and adapter.
        down: ``(H, I)`` projection and adapter.
        activation: ``"swiglu"``, ``"geglu"`` (exact gelu) or ``"geglu_tanh"``.

    Returns:
        ``(..., H)`` in ``x.dtype``.

    Raises:
        ValueError: an unknown activation, or a base weight that requires grad.
    """
    if activation not in ACTIVATIONS:
        raise ValueError(f"unknown MLP activation {activation!r}; expected swiglu, geglu or geglu_tanh")
    check_frozen(gate.weight, up.weight, down.weight)
    scalings = (float(gate.scaling), float(up.scaling), float(down.scaling))
    quant_states = (gate.quant_state, up.quant_state, down.quant_state)
    return _LoRAMLP.apply(x, activation, scalings, quant_states, *_params(gate), *_params(up), *_params(down))
