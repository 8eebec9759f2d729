"""The NF4 grouped GEMM (experts unpacked inside the GEMM) against ``dequantize_nf4`` and a float64 loop over
experts, forward and input gradient, double-quantized or not, with experts that get no rows."""

from __future__ import annotations

import pytest
import torch

from ftengine.plugins.kernels.reference import dequantize_nf4
from ftengine.plugins.kernels.reference import quantize_nf4
from ftengine.plugins.kernels.triton import lora_moe as triton_moe
from ftengine.plugins.kernels.triton import nf4_grouped_mm

from ..helpers import DEVICE
from ..helpers import ON_GPU
from ..helpers import rel_err


def _loop(x, weight, counts):
    pieces, start = [], 0
    for e, count in enumerate(counts):
        pieces.append(x[start:start + count] @ weight[e].t())
        start += count
    return torch.cat(pieces)


DTYPES = [torch.float32] + ([torch.bfloat16] if ON_GPU else [])  # the interpreter's bf16 casts truncate


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("double_quant", [True, False])
@pytest.mark.parametrize(("counts", "n_out"), [([5, 0, 19], 48), ([0, 3, 0, 2], 80)])
def test_matches_dequantize_then_a_loop_over_experts(counts, n_out, double_quant, dtype):
    g = torch.Generator().manual_seed(n_out)
    n_in = 128
    weight = (torch.randn(len(counts), n_out, n_in, generator=g) * 0.1).to(DEVICE, dtype)
    packed, state = quantize_nf4(weight, double_quant=double_quant)
    assert nf4_grouped_mm.fusable(weight, state)
    x = torch.randn(sum(counts), n_in, generator=g).to(DEVICE, dtype).requires_grad_()
    offsets = torch.tensor(counts, device=DEVICE).cumsum(0)
    y = nf4_grouped_mm.nf4_grouped_gemm(x, packed, state, offsets)
    grad = torch.randn(y.shape, generator=g).to(DEVICE, dtype)
    y.backward(grad)
    unpacked = dequantize_nf4(packed, state).double()  # the weights the kernel must decode
    x64 = x.detach().double().requires_grad_()
    truth = _loop(x64, unpacked, counts)
    truth.backward(grad.double())
    tol = 1e-6 if dtype == torch.float32 else 1e-2
    assert y.dtype == dtype and y.shape == truth.shape
    assert rel_err(y, truth) <= tol
    assert rel_err(x.grad, x64.grad) <= tol


def _nf4(weight):
    from ftengine.core.kernels import LoRAWeights

    packed, state = quantize_nf4(weight)
    return LoRAWeights(weight=packed, quant_state=state)


def test_lora_moe_takes_the_fused_path_where_blocks_fit(monkeypatch):
    """The Triton ``lora_moe`` runs NF4 experts whose rows are whole blocks through the fused kernel, and the
    others (``in`` = 32 here) through the dequantize-a-group path; both as the reference's result."""
    from ftengine.plugins.kernels.reference import lora_moe as reference_moe

    g = torch.Generator().manual_seed(3)
    n, h, ff, e, k = 7, 64, 32, 4, 2
    x = torch.randn(n, h, generator=g).to(DEVICE)
    index = torch.stack([torch.randperm(e, generator=g)[:k] for _ in range(n)]).to(DEVICE)
    weights = torch.rand(n, k, generator=g).to(DEVICE)
    gate_up = _nf4((torch.randn(e, 2 * ff, h, generator=g) * 0.2).to(DEVICE))
    down = _nf4((torch.randn(e, h, ff, generator=g) * 0.2).to(DEVICE))
    fused = []
    launch = nf4_grouped_mm.nf4_grouped_gemm
    monkeypatch.setattr(triton_moe, "nf4_grouped_gemm", lambda *a: fused.append(a[2].shape) or launch(*a))
    outs = []
    for fn in (triton_moe.lora_moe, reference_moe):
        xl = x.clone().requires_grad_()
        out = fn(xl, index, weights, gate_up, down)
        out.backward(torch.ones_like(out))
        outs += [out, xl.grad]
    assert fused == [gate_up.quant_state.shape], "gate_up (in = 64) fused, down (in = 32) not"
    assert rel_err(outs[0], outs[2]) <= 1e-5 and rel_err(outs[1], outs[3]) <= 1e-5


@pytest.mark.gpu
def test_lora_moe_on_nf4_experts_at_a_real_shape_without_host_syncs():
    """Qwen3-30B-A3B's expert shapes (128 experts, 8 a token, 256 tokens), bf16: the Triton ``lora_moe`` over NF4
    experts reads nothing back to the host, forward or backward, and gives the reference's output and input
    gradient (the reference dequantizes groups of experts into torch's grouped GEMM)."""
    from ftengine.plugins.kernels.reference import lora_moe as reference_moe

    g = torch.Generator().manual_seed(0)
    n, h, ff, e, k = 256, 2048, 768, 128, 8
    x = torch.randn(n, h, generator=g).to(DEVICE, torch.bfloat16)
    index = torch.rand(n, e, generator=g).topk(k, dim=-1).indices.to(DEVICE)
    weights = torch.rand(n, k, generator=g).softmax(-1).to(DEVICE, torch.bfloat16)
    gate_up = _nf4((torch.randn(e, 2 * ff, h, generator=g) * 0.02).to(DEVICE, torch.bfloat16))
    down = _nf4((torch.randn(e, h, ff, generator=g) * 0.02).to(DEVICE, torch.bfloat16))
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
