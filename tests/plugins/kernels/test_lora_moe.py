"""The reference ``lora_moe`` op (sort by expert, grouped GEMMs, LoRA kept low-rank) against a
per-token, per-slot loop in float64: output and every gradient (input, routing weights, LoRA
factors, base expert weights), with experts that receive no token."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from ftengine.core.kernels import LoRAWeights
from ftengine.plugins.kernels.reference import grouped_linear
from ftengine.plugins.kernels.reference import lora_moe

from .helpers import rel_err

N, H, FF, E, K, R = 13, 64, 24, 5, 2, 4


def _per_token(x, index, weights, w_gu, a_gu, b_gu, w_d, a_d, b_d, scaling):
    """``sum_k w[n,k] * down_e(silu(gate_e(x)) * up_e(x))`` one token and one slot at a time."""
    rows = []
    for n in range(x.shape[0]):
        total = torch.zeros(x.shape[1], dtype=x.dtype)
        for k in range(index.shape[1]):
            e = int(index[n, k])
            gu = w_gu[e] @ x[n] + scaling * b_gu[e] @ (a_gu[e] @ x[n])
            gate, up = gu[:FF], gu[FF:]
            h = F.silu(gate) * up
            total = total + weights[n, k] * (w_d[e] @ h + scaling * b_d[e] @ (a_d[e] @ h))
        rows.append(total)
    return torch.stack(rows)


def _inputs(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, H, generator=g, dtype=torch.float64)
    index = torch.stack([torch.randperm(E - 1, generator=g)[:K] for _ in range(N)])  # expert E-1 gets no token
    weights = torch.rand(N, K, generator=g, dtype=torch.float64)
    tensors = [torch.randn(*shape, generator=g, dtype=torch.float64) * 0.2 for shape in
               ((E, 2 * FF, H), (E, R, H), (E, 2 * FF, R), (E, H, FF), (E, R, FF), (E, H, R))]
    return x, index, weights, tensors


@pytest.mark.parametrize(("dtype", "tol"), [(torch.float64, 1e-10), (torch.float32, 1e-5), (torch.bfloat16, 3e-2)])
def test_matches_a_per_token_loop(dtype, tol):
    """float32/bfloat16 run ``torch._grouped_mm`` on the CPU; float64 runs the per-expert fallback."""
    x, index, weights, tensors = _inputs()
    leaves = [t.to(dtype).requires_grad_() for t in (x, weights, *tensors)]
    xl, wl, w_gu, a_gu, b_gu, w_d, a_d, b_d = leaves
    gate_up = LoRAWeights(weight=w_gu, lora_a=a_gu, lora_b=b_gu, scaling=1.5)
    down = LoRAWeights(weight=w_d, lora_a=a_d, lora_b=b_d, scaling=1.5)
    out = lora_moe(xl, index, wl, gate_up, down)
    assert out.dtype == dtype and out.shape == (N, H)
    truth_leaves = [t.detach().double().requires_grad_() for t in leaves]
    truth = _per_token(truth_leaves[0], index, truth_leaves[1], *truth_leaves[2:], scaling=1.5)
    grad = torch.randn(N, H, dtype=torch.float64)
    out.backward(grad.to(dtype))
    truth.backward(grad)
    assert rel_err(out, truth) <= tol
    names = ("x", "routing weights", "gate_up W", "gate_up A", "gate_up B", "down W", "down A", "down B")
    for name, ours, ref in zip(names, leaves, truth_leaves, strict=True):
        assert rel_err(ours.grad, ref.grad) <= tol, f"gradient of {name}: {rel_err(ours.grad, ref.grad):.2e}"
    assert (w_gu.grad[E - 1] == 0).all(), "an expert without tokens must get no gradient"


def test_grouped_linear_empty_and_single_groups():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(7, 16, generator=g)
    w = torch.randn(4, 8, 16, generator=g)
    offsets = torch.tensor([0, 7, 7, 7], dtype=torch.int32)  # all rows go to expert 1
    torch.testing.assert_close(grouped_linear(x, w, offsets), x @ w[1].t())
    torch.testing.assert_close(grouped_linear(x.double(), w.double(), offsets), x.double() @ w[1].double().t())


def test_unknown_activation_is_named():
    x, index, weights, tensors = _inputs()
    layers = LoRAWeights(weight=tensors[0]), LoRAWeights(weight=tensors[3])
    with pytest.raises(ValueError, match="relu"):
        lora_moe(x, index, weights, *layers, activation="relu")


def _nf4_layers(tensors, scaling=1.5):
    """NF4 base weights (fp32 unpacked) with fp32 LoRA, and the same with the dequantized weights dense."""
    from ftengine.plugins.kernels.reference import dequantize_nf4
    from ftengine.plugins.kernels.reference import quantize_nf4

    w_gu, a_gu, b_gu, w_d, a_d, b_d = (t.float() for t in tensors)
    quantized, dense = [], []
    for w, a, b in ((w_gu, a_gu, b_gu), (w_d, a_d, b_d)):
        packed, state = quantize_nf4(w)
        a, b = a.requires_grad_(), b.requires_grad_()
        quantized.append(LoRAWeights(weight=packed, lora_a=a, lora_b=b, scaling=scaling, quant_state=state))
        dense.append(LoRAWeights(weight=dequantize_nf4(packed, state), lora_a=a, lora_b=b, scaling=scaling))
    return quantized, dense


def test_nf4_experts_unpacked_a_group_at_a_time(monkeypatch):
    """Same output and gradients as the dequantized weights held dense, while at most one group of experts'
    unpacked weights is alive at any moment, forward and backward (tracked on every unpacked tensor)."""
    import weakref

    from ftengine.plugins.kernels import reference

    x, index, weights, tensors = _inputs(seed=5)
    quantized, dense = _nf4_layers(tensors)
    per_expert = 2 * FF * H * 4  # the larger (gate_up) expert in fp32
    monkeypatch.setattr(reference, "EXPERT_GROUP_BYTES", 2 * per_expert)  # groups of 2 of the 5 experts
    live, peak = [0], [0]
    unpack = reference.dequantize_nf4

    def tracked(packed, state):
        out = unpack(packed, state)
        size = out.numel() * out.element_size()
        live[0] += size
        peak[0] = max(peak[0], live[0])
        weakref.finalize(out, lambda: live.__setitem__(0, live[0] - size))
        return out

    monkeypatch.setattr(reference, "dequantize_nf4", tracked)
    grad = torch.randn(N, H)
    results = []
    for layers in (quantized, dense):
        xl, wl = x.float().requires_grad_(), weights.float().requires_grad_()
        out = lora_moe(xl, index, wl, *layers)
        out.backward(grad)
        factors = [t.grad.clone() for layer in layers for t in (layer.lora_a, layer.lora_b)]
        results.append((out, xl.grad, wl.grad, factors))
        for layer in layers:
            layer.lora_a.grad = layer.lora_b.grad = None
    assert 0 < peak[0] <= 2 * per_expert < E * per_expert
    (out_q, dx_q, dw_q, f_q), (out_d, dx_d, dw_d, f_d) = results
    for ours, ref in ((out_q, out_d), (dx_q, dx_d), (dw_q, dw_d), *zip(f_q, f_d, strict=True)):
        assert rel_err(ours, ref) <= 1e-5


def test_expert_groups_cover_every_expert_once():
    from ftengine.plugins.kernels.reference import expert_groups
    from ftengine.plugins.kernels.reference import quantize_nf4

    _, state = quantize_nf4(torch.zeros(7, 64, 64, dtype=torch.bfloat16))
    assert expert_groups(state, torch.bfloat16, budget=3 * 64 * 64 * 2) == [(0, 3), (3, 6), (6, 7)]
    assert expert_groups(state, torch.bfloat16, budget=1) == [(e, e + 1) for e in range(7)]


@pytest.mark.parametrize("weights_dtype", [torch.bfloat16, torch.float32])
def test_slot_sum_accumulates_in_fp32(weights_dtype):
    """The k-sum of bf16 expert outputs: one rounding of the fp32 sum, whether the routing weights are bf16 (one
    batched GEMM) or fp32 (as Mixtral's router gives them)."""
    from ftengine.plugins.kernels.reference import _weighted_sum

    g = torch.Generator().manual_seed(11)
    rows = torch.randn(64, 8, 96, generator=g).to(torch.bfloat16)
    weights = torch.rand(64, 8, generator=g).to(weights_dtype)
    truth = (rows.double() * weights.double().unsqueeze(-1)).sum(1)
    ours = _weighted_sum(rows, weights)
    assert ours.dtype == torch.promote_types(rows.dtype, weights_dtype)
    # fp32 accumulation (8 terms at 2^-24 each) and, for a bf16 result, one rounding of the sum (within 2^-8)
    accumulation = 8 * 2.0 ** -24 * (rows.double() * weights.double().unsqueeze(-1)).abs().sum(1)
    rounding = 2.0 ** -8 * truth.abs() if ours.dtype == torch.bfloat16 else 0.0
    assert ((ours.double() - truth).abs() <= rounding + accumulation).all()


def test_dispatched_rows_gradient_for_any_strides():
    """The rows' gradient back to the tokens is indexing's own, also for a gradient that is not contiguous."""
    from ftengine.plugins.kernels.reference import _DispatchRows

    g = torch.Generator().manual_seed(2)
    x = torch.randn(6, 8, generator=g, dtype=torch.float64, requires_grad=True)
    order = torch.randperm(12, generator=g)
    grad = torch.randn(8, 12, generator=g, dtype=torch.float64).t()  # (12, 8), transposed strides
    _DispatchRows.apply(x, order, 2).backward(grad)
    reference = x.detach().clone().requires_grad_()
    reference[order // 2].backward(grad)
    assert torch.allclose(x.grad, reference.grad, rtol=0, atol=1e-12)
