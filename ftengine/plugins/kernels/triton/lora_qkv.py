"""Q, K and V projections with LoRA, fused with their frozen base weights, sharing one read of x.

For each of q, k, v: ``y_i = x W_i^T + b_i + s_i (x A_i^T) B_i^T``. The adapters' down
projections run as one GEMM against the stacked ``[A_q; A_k; A_v]`` (r_q + r_k + r_v, in), so x
is read once for all three, and the backward mirrors it:

    dya_i = s_i dy_i B_i                            (N, r_i), stacked into dya (N, sum r)
    dA    = dya^T x                                  one GEMM, split per adapter
    dB_i  = s_i dy_i^T xa_i
    dx    = sum_i dy_i W_i + dya [A_q; A_k; A_v]

Saved: ``x`` when an A is trained, and the stacked ``xa`` is recomputed from it in the backward
(one GEMM of ``sum r`` columns); only with every A frozen is ``xa`` saved instead.
"""

from __future__ import annotations

import torch

from ftengine.core.kernels import LoRAWeights
from ftengine.plugins.kernels.triton.lora_linear import add_input_grad
from ftengine.plugins.kernels.triton.lora_linear import bias_grad
from ftengine.plugins.kernels.triton.lora_linear import check_frozen
from ftengine.plugins.kernels.triton.lora_linear import compute_copy
from ftengine.plugins.kernels.triton.lora_linear import forward_projection
from ftengine.plugins.kernels.triton.lora_linear import saved_adapter_inputs
from ftengine.plugins.kernels.triton.lora_linear import stacked_copy


def _adapted(p) -> bool:
    return p[1] is not None and p[2] is not None


def _stacked_xa(x2: torch.Tensor, layers: list, adapted: list[int]) -> torch.Tensor:
    """``x [A_q; A_k; A_v]^T`` (N, sum r) over the adapted projections, one GEMM."""
    return x2 @ stacked_copy([layers[i][1] for i in adapted], x2.dtype).t()


class _LoRAQKV(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, scalings, quant_states, *params):
        layers = [params[0:4], params[4:8], params[8:12]]  # (weight, lora_a, lora_b, bias) each
        x2 = x.reshape(-1, x.shape[-1])  # (N, in)
        adapted = [i for i, p in enumerate(layers) if _adapted(p)]
        ranks = [layers[i][1].shape[0] for i in adapted]
        xa_all = None
        if adapted:
            xa_all = _stacked_xa(x2, layers, adapted)
        xas = dict(zip(adapted, xa_all.split(ranks, dim=1), strict=False)) if adapted else {}
        outs = []
        for i, (p, s, q) in enumerate(zip(layers, scalings, quant_states, strict=False)):
            y, _ = forward_projection(x2, p[0], q, p[3], p[1], p[2], s, xa=xas.get(i))
            outs.append(y.reshape(*x.shape[:-1], y.shape[-1]))
        needs = ctx.needs_input_grad
        need_da = any(needs[3 + 4 * i + 1] for i in adapted)
        need_db = any(needs[3 + 4 * i + 2] for i in adapted)
        ctx.save_for_backward(*saved_adapter_inputs(x2, xa_all, need_da, need_db), *params)
        ctx.adapted, ctx.ranks, ctx.scalings, ctx.quant_states = adapted, ranks, scalings, quant_states
        ctx.in_shape = x.shape
        return tuple(outs)

    @staticmethod
    def backward(ctx, *dys):
        x2, xa_all, *params = ctx.saved_tensors
        layers = [params[0:4], params[4:8], params[8:12]]
        needs = ctx.needs_input_grad
        dys = [dy.reshape(-1, dy.shape[-1]) for dy in dys]  # (N, out_i)
        if xa_all is None and any(needs[3 + 4 * i + 2] for i in ctx.adapted):
            xa_all = _stacked_xa(x2, layers, ctx.adapted)
        xas = dict(zip(ctx.adapted, xa_all.split(ctx.ranks, dim=1), strict=False)) if xa_all is not None else {}
        grads = [[None, None, None, bias_grad(dys[i], layers[i][3], needs[3 + 4 * i + 3])] for i in range(3)]
        dya_parts = []
        for i in ctx.adapted:
            _, a, b, _ = layers[i]
            s = ctx.scalings[i]
            dy = dys[i]
            if needs[3 + 4 * i + 2]:
                grads[i][2] = (dy.t() @ xas[i]).mul_(s).to(b.dtype)  # (out, r)
            dya_parts.append((dy @ compute_copy(b, dy.dtype)).mul_(s))  # (N, r)
        dya = torch.cat(dya_parts, dim=1) if dya_parts else None  # (N, sum r)
        if dya is not None and any(needs[3 + 4 * i + 1] for i in ctx.adapted):
            da_all = dya.t() @ x2  # (sum r, in)
            for i, da in zip(ctx.adapted, da_all.split(ctx.ranks, dim=0), strict=False):
                if needs[3 + 4 * i + 1]:
                    grads[i][1] = da.to(layers[i][1].dtype)
        dx = None
        if needs[0]:
            for i, p in enumerate(layers):
                dx = add_input_grad(dx, dys[i], p[0], ctx.quant_states[i], None, None)
            if dya is not None:
                a_stack = stacked_copy([layers[i][1] for i in ctx.adapted], dx.dtype)  # (sum r, in)
                dx.addmm_(dya, a_stack)
            dx = dx.reshape(ctx.in_shape)
        return (dx, None, None, *grads[0], *grads[1], *grads[2])


def _params(layer: LoRAWeights) -> tuple:
    return (layer.weight, layer.lora_a, layer.lora_b, layer.bias)


def lora_qkv(
    x: torch.Tensor, q: LoRAWeights, k: LoRAWeights, v: LoRAWeights
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The attention input projections, each a frozen base plus its LoRA adapter.

    Args:
        x: ``(..., in)`` input, read once for the three adapters.
        q: query projection ``(out_q, in)`` and adapter.
        k: key projection ``(out_k, in)`` and adapter.
        v: value projection ``(out_v, in)`` and adapter.

    Returns:
        ``(q_out, k_out, v_out)``, each ``(..., out_i)`` in ``x.dtype``.

    Raises:
        ValueError: a base weight that requires grad.
    """
    check_frozen(q.weight, k.weight, v.weight)
    scalings = (float(q.scaling), float(k.scaling), float(v.scaling))
    quant_states = (q.quant_state, k.quant_state, v.quant_state)
    return _LoRAQKV.apply(x, scalings, quant_states, *_params(q), *_params(k), *_params(v))
