"""The Triton grouped GEMM (``grouped_gemm``) and the Triton backend's ``lora_moe`` against a float64
loop over experts, forward and backward, at small odd shapes with experts that get no rows; the
registry picks the Triton ``lora_moe``, which runs its own kernels where ``torch._grouped_mm`` is absent."""

from __future__ import annotations

import pytest
import torch

from ftengine.core.kernels import LoRAWeights
from ftengine.core.kernels import resolve_op
from ftengine.plugins.kernels.reference import ReferenceBackend
from ftengine.plugins.kernels.reference import quantize_nf4
from ftengine.plugins.kernels.triton import TritonBackend
from ftengine.plugins.kernels.triton import lora_moe as triton_moe

from ..helpers import DEVICE
from ..helpers import rel_err


def _loop(x, weight, counts):
    """float64 ``x_e @ W_e^T`` one expert at a time."""
    pieces, start = [], 0
    for e, count in enumerate(counts):
        pieces.append(x[start:start + count].double() @ weight[e].double().t())
        start += count
    return torch.cat(pieces)


@pytest.mark.parametrize(("dtype", "tol"), [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize(("counts", "n_in", "n_out"), [([5, 0, 17, 3], 24, 37), ([0, 33, 0], 40, 8)])
def test_grouped_gemm_matches_a_loop_over_experts(counts, n_in, n_out, dtype, tol):
    g = torch.Generator().manual_seed(len(counts))
    x = torch.randn(sum(counts), n_in, generator=g).to(DEVICE, dtype).requires_grad_()
    w = (torch.randn(len(counts), n_out, n_in, generator=g) * 0.3).to(DEVICE, dtype).requires_grad_()
    offsets = torch.tensor(counts, device=DEVICE).cumsum(0).to(torch.int32)
    y = triton_moe.grouped_gemm(x, w, offsets)
    grad = torch.randn(y.shape, generator=g).to(DEVICE, dtype)
    y.backward(grad)
    x64, w64 = x.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    truth = _loop(x64, w64, counts)
    truth.backward(grad.double())
    assert y.dtype == dtype and y.shape == truth.shape
    assert rel_err(y, truth) <= tol
    assert rel_err(x.grad, x64.grad) <= tol
    assert rel_err(w.grad, w64.grad) <= tol
    for e, count in enumerate(counts):
        if count == 0:
            assert (w.grad[e] == 0).all(), "an expert without rows must get a zero gradient"


def test_registry_picks_the_triton_lora_moe(monkeypatch):
    monkeypatch.delenv("FTENGINE_KERNELS", raising=False)
    backend, fn = resolve_op("lora_moe", [ReferenceBackend(), TritonBackend()])
    assert backend == "triton" and fn is triton_moe.lora_moe


@pytest.mark.parametrize("nf4", [False, True])
def test_lora_moe_without_torch_grouped_mm(monkeypatch, nf4):
    """No ``torch._grouped_mm``: every product on the Triton kernels; output and all gradients as the reference's
    per-expert matmuls (NF4 base weights unpacked by the Triton dequantizer)."""
    from ftengine.plugins.kernels.reference import lora_moe as reference_moe

    g = torch.Generator().manual_seed(7)
    n, h, ff, e, k, r = 9, 32, 16, 4, 2, 3
    x = torch.randn(n, h, generator=g).to(DEVICE)
    index = torch.stack([torch.randperm(e - 1, generator=g)[:k] for _ in range(n)]).to(DEVICE)
    weights = torch.rand(n, k, generator=g).to(DEVICE)
    shapes = ((e, 2 * ff, h), (e, r, h), (e, 2 * ff, r), (e, h, ff), (e, r, ff), (e, h, r))
    tensors = [(torch.randn(*s, generator=g) * 0.2).to(DEVICE) for s in shapes]
    calls = []
    launch = triton_moe._grouped_mm
    monkeypatch.setattr(triton_moe, "_grouped_mm", lambda *a: calls.append(1) or launch(*a))
    results = []
    for fn, grouped in ((triton_moe.lora_moe, False), (reference_moe, True)):
        if not grouped:
            monkeypatch.delattr(torch, "_grouped_mm", raising=False)
        leaves = [t.clone().requires_grad_() for t in (x, weights, *tensors)]
        xl, wl, w_gu, a_gu, b_gu, w_d, a_d, b_d = leaves
        layers = []
        for w, a, b in ((w_gu, a_gu, b_gu), (w_d, a_d, b_d)):
            base = dict(weight=w) if not nf4 else dict(zip(("weight", "quant_state"), quantize_nf4(w), strict=True))
            layers.append(LoRAWeights(**base, lora_a=a, lora_b=b, scaling=0.5))
        out = fn(xl, index, wl, *layers)
        out.backward(torch.ones_like(out))
        results.append([out] + [t.grad for t in leaves if t.grad is not None])
        monkeypatch.undo()
        monkeypatch.setattr(triton_moe, "_grouped_mm", lambda *a: calls.append(1) or launch(*a))
    assert calls, "the Triton grouped GEMM never ran"
    ours, theirs = results
    assert len(ours) == len(theirs) == (7 if nf4 else 9)  # the output, then every gradient
    for a, b in zip(ours, theirs, strict=True):
        assert rel_err(a, b) <= 1e-5


@pytest.mark.parametrize(("counts", "block_m"), [([5, 0, 17, 3], 4), ([0, 33, 0], 16), ([0, 0], 8), ([64] * 20, 16)])
def test_expert_tiles_cover_each_experts_rows_once(counts, block_m):
    """Every row of every expert is in exactly one tile of at most ``block_m`` rows of that expert; the other
    tiles are empty."""
    from ftengine.plugins.kernels.triton._expert_tiles import expert_tiles

    offsets = torch.tensor(counts, device=DEVICE).cumsum(0).to(torch.int32)
    expert, start, end = (t.tolist() for t in expert_tiles(offsets, sum(counts), block_m))
    assert len(expert) == -(-sum(counts) // block_m) + len(counts)
    covered = []
    for e, s, t in zip(expert, start, end, strict=True):
        if s >= t:
            continue
        first = sum(counts[:e])
        assert first <= s < t <= first + counts[e]
        covered += [(e, row) for row in range(s, min(t, s + block_m))]
    truth = [(e, row) for e, n in enumerate(counts) for row in range(sum(counts[:e]), sum(counts[:e]) + n)]
    assert sorted(covered) == truth


def _nf4_layer(weight):
    packed, state = quantize_nf4(weight)
    return LoRAWeights(weight=packed, quant_state=state)


@pytest.mark.gpu
def test_lora_moe_on_nf4_experts_at_a_real_shape_without_host_syncs():
    """Qwen3-30B-A3B's expert shapes (128 experts, 8 a token, 256 tokens), bf16: the Triton ``lora_moe`` over NF4
    experts (a layer's unpacked at once) reads nothing back to the host, forward or backward, and gives the
    reference's output and input gradient."""
    from ftengine.plugins.kernels.reference import lora_moe as reference_moe

    g = torch.Generator().manual_seed(0)
    n, h, ff, e, k = 256, 2048, 768, 128, 8
    x = torch.randn(n, h, generator=g).to(DEVICE, torch.bfloat16)
    index = torch.rand(n, e, generator=g).topk(k, dim=-1).indices.to(DEVICE)
    weights = torch.rand(n, k, generator=g).softmax(-1).to(DEVICE, torch.bfloat16)
    gate_up = _nf4_layer((torch.randn(e, 2 * ff, h, generator=g) * 0.02).to(DEVICE, torch.bfloat16))
    down = _nf4_layer((torch.randn(e, h, ff, generator=g) * 0.02).to(DEVICE, torch.bfloat16))
    results = []
    for fn in (triton_moe.lora_moe, reference_moe):
        xl = x.clone().requires_grad_()
        if fn is triton_moe.lora_moe:
            fn(xl, index, weights, gate_up, down)  # compiles the kernels first
            torch.cuda.synchronize()
            torch.cuda.set_sync_debug_mode("error")
        try:
            out = fn(xl, index, weights, gate_up, down)
            out.backward(torch.ones_like(out))
        finally:
            torch.cuda.set_sync_debug_mode("default")
        results += [out.float(), xl.grad.float()]
    assert rel_err(results[0], results[2]) <= 1e-2 and rel_err(results[1], results[3]) <= 1e-2
