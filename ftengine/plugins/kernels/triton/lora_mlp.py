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

The activation backward writes ``h`` over ``dh``, ``dg`` over ``g`` and ``du`` over ``u``, and
``dh`` exists one row chunk at a time (``DH_CHUNK_BYTES``): the backward adds no (N, I) buffer,
which is also why it can run only once. For long sequences (``SAVE_LIMIT_BYTES``) nothing of size
(N, I) is kept at all: the forward and backward run in token chunks and the backward recomputes
each chunk's ``g`` and ``u`` from ``x``. In a gradient checkpoint's recomputation
(:func:`ftengine.core.kernels.recomputing`) the op makes only what it saves: no ``h``, no down
projection, whose output the recomputation would throw away.
"""

from __future__ import annotations

import torch

from ftengine.core.kernels import LoRAWeights
from ftengine.core.kernels import recomputing
from ftengine.plugins.kernels.triton.geglu import geglu_backward
from ftengine.plugins.kernels.triton.geglu import geglu_forward
from ftengine.plugins.kernels.triton.lora_linear import adapter_grads
from ftengine.plugins.kernels.triton.lora_linear import add_input_grad
from ftengine.plugins.kernels.triton.lora_linear import base_weight
from ftengine.plugins.kernels.triton.lora_linear import bias_grad
from ftengine.plugins.kernels.triton.lora_linear import check_frozen
from ftengine.plugins.kernels.triton.lora_linear import compute_copy
from ftengine.plugins.kernels.triton.lora_linear import forward_projection
from ftengine.plugins.kernels.triton.lora_linear import saved_adapter_inputs
from ftengine.plugins.kernels.triton.swiglu import swiglu_backward
from ftengine.plugins.kernels.triton.swiglu import swiglu_forward

ACTIVATIONS = ("swiglu", "geglu", "geglu_tanh")
# Long sequences: when g and u together would pass this, the op keeps only x and recomputes them in
# token chunks of about CHUNK_BYTES (one of g or u) in the backward, so the MLP's activation memory no
# longer grows with the sequence (the price: the gate and up matmuls run once more).
SAVE_LIMIT_BYTES = 1 << 30
CHUNK_BYTES = 256 << 20
# the backward's (N, I) gradient of the activation output is made in row chunks of about this size
DH_CHUNK_BYTES = 64 << 20


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


def _gate_up(x2, params, scalings, quant_states):
    """``(g, u, xa_g, xa_u)`` for rows ``x2``: the gate and up projections with their adapters."""
    (pg, pu), (sg, su), (qg, qu) = (params[0:4], params[4:8]), scalings[:2], quant_states[:2]
    g, xa_g = forward_projection(x2, pg[0], qg, pg[3], pg[1], pg[2], sg)  # (n, I), (n, r)
    u, xa_u = forward_projection(x2, pu[0], qu, pu[3], pu[1], pu[2], su)
    return g, u, xa_g, xa_u


def _forward_rows(x2, params, scalings, quant_states, activation):
    """``(y, g, u, xa_g, xa_u)`` for rows ``x2``; ``h`` is made and dropped."""
    pd, sd, qd = params[8:12], scalings[2], quant_states[2]
    g, u, xa_g, xa_u = _gate_up(x2, params, scalings, quant_states)
    h = _act_forward(g, u, activation)  # (n, I)
    y, _ = forward_projection(h, pd[0], qd, pd[3], pd[1], pd[2], sd)  # (n, H)
    return y, g, u, xa_g, xa_u


def _accumulate(total: torch.Tensor | None, part: torch.Tensor) -> torch.Tensor:
    return part.float() if total is None else total.add_(part)


def _down_backward(dy2, g, u, pd, sd, qd, nd, activation):
    """``(dA_d, dB_d)`` of the down projection; ``g`` and ``u`` become ``dg`` and ``du`` in place.

    ``dh = dy W_d + s_d (dy B_d) A_d`` exists one row chunk (``DH_CHUNK_BYTES``) at a time, with the
    activation backward and the down adapter's gradients done per chunk: the full ``(N, I)`` ``dh``
    would be the backward's largest buffer. ``W_d`` is unpacked once for all chunks.
    """
    dtype = dy2.dtype
    has_d = _has_adapter(pd[1], pd[2])
    w_d = base_weight(pd[0], qd, dtype)  # (H, I)
    a_d = compute_copy(pd[1], dtype) if has_d else None  # (r, I)
    b_d = compute_copy(pd[2], dtype) if has_d else None  # (H, r)
    rows = max(1, DH_CHUNK_BYTES // (g.shape[1] * g.element_size()))
    da_d = db_d = None
    for i in range(0, dy2.shape[0], rows):
        dy = dy2[i:i + rows]
        dh = dy @ w_d  # (c, I)
        dya = None
        if has_d:
            dya = (dy @ b_d).mul_(sd)  # (c, r)
            dh.addmm_(dya, a_d)
        _act_backward(dh, g[i:i + rows], u[i:i + rows], activation)
        h = dh
        if has_d and nd[1]:
            da_d = _accumulate(da_d, dya.t() @ h)  # (r, I)
        if has_d and nd[2]:
            db_d = _accumulate(db_d, adapter_grads(dy, h, None, pd[1], pd[2], sd, False, True, False)[1])  # (H, r)
        del dh, h  # before the next chunk's is allocated
    return (None if da_d is None else da_d.to(pd[1].dtype)), (None if db_d is None else db_d.to(pd[2].dtype))


def _backward_rows(x2, g, u, xa_g, xa_u, dy2, params, scalings, quant_states, needs, activation):
    """``(dx, grads)`` for rows ``x2`` with their ``g``, ``u`` (overwritten: ``dg``, ``du``) and ``dy2``.

    ``grads``: ``(weight, lora_a, lora_b, bias)`` gradients for gate, up and down, in that order.
    """
    pg, pu, pd = params[0:4], params[4:8], params[8:12]
    sg, su, sd = scalings
    qg, qu, qd = quant_states
    ng, nu, nd = needs[4:8], needs[8:12], needs[12:16]  # per layer: (weight, lora_a, lora_b, bias)

    da_d, db_d = _down_backward(dy2, g, u, pd, sd, qd, nd, activation)
    dbias_d = bias_grad(dy2, pd[3], nd[3])
    dg, du = g, u

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
    return dx, grads


def _chunk_rows(n_rows: int, inter: int, elem_bytes: int) -> int | None:
    """Rows per chunk when ``g`` and ``u`` would exceed ``SAVE_LIMIT_BYTES`` (long sequences), else None."""
    if 2 * n_rows * inter * elem_bytes <= SAVE_LIMIT_BYTES:
        return None
    return max(1, CHUNK_BYTES // (inter * elem_bytes))


def _add(total: list, grads: list) -> list:
    return [t if g is None else g if t is None else t.add_(g) for t, g in zip(total, grads, strict=True)]


def _out_features(params, quant_states, layer: int) -> int:
    """Output features of gate (0), up (1) or down (2): an NF4 weight's are in its quant state."""
    state = quant_states[layer]
    return state.shape[0] if state is not None else params[4 * layer].shape[0]


def _needs(ctx) -> tuple[bool, ...]:
    """``needs_input_grad`` without the recompute flag: x at 0, then per layer (weight, lora_a, lora_b, bias):
    gate 4..7, up 8..11, down 12..15."""
    return ctx.needs_input_grad[:4] + ctx.needs_input_grad[5:]


class _LoRAMLP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, activation, scalings, quant_states, recompute, *params):
        # params: (weight, lora_a, lora_b, bias) for gate, up, down
        x2 = x.reshape(-1, x.shape[-1])  # (N, H)
        inter = _out_features(params, quant_states, 0)
        chunk = _chunk_rows(x2.shape[0], inter, x2.element_size())
        needs = _needs(ctx)
        if recompute:  # the output is thrown away: the saved tensors are all the recomputation is for
            y = x2.new_empty(x2.shape[0], _out_features(params, quant_states, 2))
        if chunk is None:
            if recompute:
                g, u, xa_g, xa_u = _gate_up(x2, params, scalings, quant_states)
            else:
                y, g, u, xa_g, xa_u = _forward_rows(x2, params, scalings, quant_states, activation)
            x_kept, xa_g = saved_adapter_inputs(x2, xa_g, needs[5] or needs[9], needs[6])
            xa_u = saved_adapter_inputs(x2, xa_u, needs[5] or needs[9], needs[10])[1]
            ctx.save_for_backward(x_kept, g, u, xa_g, xa_u, *params)
        else:  # only x is kept; g and u come back chunk by chunk in the backward
            if not recompute:
                y = torch.cat([_forward_rows(x2[i:i + chunk], params, scalings, quant_states, activation)[0]
                               for i in range(0, x2.shape[0], chunk)])
            ctx.save_for_backward(x2, None, None, None, None, *params)
        ctx.activation, ctx.scalings, ctx.quant_states, ctx.chunk = activation, scalings, quant_states, chunk
        ctx.in_shape = x.shape
        ctx.consumed = False
        return y.reshape(*x.shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, dy):
        if ctx.consumed:
            raise RuntimeError("lora_mlp's backward reuses its saved activations in place and runs only once")
        ctx.consumed = True
        x2, g, u, xa_g, xa_u, *params = ctx.saved_tensors
        dy2 = dy.reshape(-1, dy.shape[-1])  # (N, H)
        rest = (params, ctx.scalings, ctx.quant_states, _needs(ctx), ctx.activation)
        if ctx.chunk is None:
            dx, grads = _backward_rows(x2, g, u, xa_g, xa_u, dy2, *rest)
        else:
            dx = torch.empty_like(x2) if ctx.needs_input_grad[0] else None
            grads = [None] * 12
            for i in range(0, x2.shape[0], ctx.chunk):
                rows = x2[i:i + ctx.chunk]
                g, u, _, _ = _gate_up(rows, params, ctx.scalings, ctx.quant_states)
                dx_rows, chunk_grads = _backward_rows(rows, g, u, None, None, dy2[i:i + ctx.chunk], *rest)
                if dx is not None:
                    dx[i:i + ctx.chunk] = dx_rows
                grads = _add(grads, chunk_grads)
        dx = dx.reshape(ctx.in_shape) if dx is not None else None
        return (dx, None, None, None, None, *grads)


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
    # a checkpoint's recomputation (grad mode on here, off inside forward) needs only what the backward reads
    return _LoRAMLP.apply(x, activation, scalings, quant_states, recomputing(), *_params(gate), *_params(up),
                          *_params(down))
