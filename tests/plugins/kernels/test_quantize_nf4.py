"""``quantize_nf4`` (ftengine's own NF4 packing, bitsandbytes' layout) against a float64 nearest-level
computation, bitsandbytes' own quantizer, and both dequantizers; expert ranges taken without copies."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from ftengine.plugins.kernels.reference import _NF4_CODE
from ftengine.plugins.kernels.reference import dequantize_nf4
from ftengine.plugins.kernels.reference import quantize_nf4


def _weight(shape=(3, 96, 64), seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g) * torch.rand(shape[0], 1, 1, generator=g)).to(dtype)


def _nearest_codes(weight: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per value, the index of the NF4 level nearest ``w / absmax`` of its block, in float64; and the absmax."""
    blocks = weight.double().reshape(-1, blocksize)
    absmax = blocks.abs().amax(-1, keepdim=True)
    levels = torch.tensor(_NF4_CODE, dtype=torch.float64)
    return (blocks / absmax).unsqueeze(-1).sub(levels).abs().argmin(-1).reshape(-1), absmax.reshape(-1)


def _unpack(packed: torch.Tensor) -> torch.Tensor:
    flat = packed.reshape(-1).long()
    return torch.stack((flat >> 4, flat & 15), dim=1).reshape(-1)


@pytest.mark.parametrize("blocksize", [64, 128])
def test_codes_and_absmax_are_the_nearest_levels(blocksize):
    weight = _weight()
    packed, state = quantize_nf4(weight, blocksize=blocksize, double_quant=False)
    codes, absmax = _nearest_codes(weight, blocksize)
    assert packed.shape == (3, 96 * 64 // 2) and packed.dtype == torch.uint8
    assert torch.equal(_unpack(packed), codes)
    torch.testing.assert_close(state.absmax.reshape(-1).double(), absmax, rtol=0, atol=0)


def test_same_bytes_as_bitsandbytes():
    functional = pytest.importorskip("bitsandbytes.functional")
    weight = _weight(seed=1)
    packed, state = quantize_nf4(weight, double_quant=False)
    theirs, their_state = functional.quantize_4bit(weight.reshape(-1, 64), blocksize=64, quant_type="nf4",
                                                   compress_statistics=False)
    assert torch.equal(packed.reshape(-1), theirs.reshape(-1))
    assert torch.equal(state.absmax.reshape(-1), their_state.absmax)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_double_quantized_absmax_round_trip(dtype):
    """~4.13 bits a weight, and the coded absmax within 1/255 of its group's spread of the true one."""
    weight = _weight(shape=(4, 128, 128), seed=2, dtype=dtype)
    packed, nested = quantize_nf4(weight)
    _, plain = quantize_nf4(weight, double_quant=False)
    assert nested.nested and nested.state2.blocksize == 256
    assert (nested.nbytes(packed) - 256 * 4) * 8 / weight.numel() < 4.13  # the code table is one for all
    ours = dequantize_nf4(packed, nested)
    assert ours.dtype == dtype and ours.shape == weight.shape
    exact = dequantize_nf4(packed, replace(plain, dtype=torch.float32))
    ours_fp32 = dequantize_nf4(packed, replace(nested, dtype=torch.float32))
    spread = (plain.absmax - plain.absmax.mean()).abs().reshape(4, -1, 256).amax(-1)  # per group
    error = (ours_fp32 - exact).abs().reshape(4, -1, 256 * 64).amax(-1)
    assert (error <= spread / 255 * 1.01 + 1e-6).all()
    assert ((ours.float() - weight.float()).norm() / weight.float().norm()).item() < 0.12


def test_triton_dequantizes_the_same_values():
    from ftengine.plugins.kernels.triton.dequantize_nf4 import dequantize_nf4 as triton_dequantize

    packed, state = quantize_nf4(_weight(shape=(3, 64, 64), seed=3, dtype=torch.bfloat16))
    assert torch.equal(triton_dequantize(packed, state), dequantize_nf4(packed, state))


def test_expert_ranges_are_views_of_the_whole():
    weight = _weight(shape=(5, 64, 32), seed=4)
    packed, state = quantize_nf4(weight)
    whole = dequantize_nf4(packed, state)
    part, sub = state.experts(packed, 1, 4)
    assert part.data_ptr() == packed[1].data_ptr() and sub.shape == (3, 64, 32)
    assert torch.equal(dequantize_nf4(part, sub), whole[1:4])


def test_rows_that_are_not_whole_blocks_are_refused():
    with pytest.raises(ValueError, match="not a whole number of blocks of 64"):
        quantize_nf4(torch.zeros(2, 3, 7))


def test_qwen3_30b_a3b_expert_memory():
    """Qwen3-30B-A3B (48 layers x 128 experts, gate_up (1536, 2048), down (2048, 768)): one expert of each
    quantized for real, scaled to the model: under 15 GB of NF4 experts, and each layer's experts unpacked in
    one piece (bf16, 768 MiB for gate_up): no row counts read back, and no more than EXPERT_GROUP_BYTES."""
    from ftengine.plugins.kernels.reference import EXPERT_GROUP_BYTES
    from ftengine.plugins.kernels.reference import expert_groups

    total, peak = 0, 0
    for shape in ((1536, 2048), (2048, 768)):
        weight = _weight(shape=(1, *shape), seed=5, dtype=torch.bfloat16)
        packed, state = quantize_nf4(weight)
        total += 48 * 128 * (state.nbytes(packed) - 256 * 4)
        groups = expert_groups(replace(state, shape=torch.Size((128, *shape))), torch.bfloat16)
        assert groups == [(0, 128)]
        peak = max(peak, 128 * weight.numel() * 2)
    assert total < 15.0e9
    assert peak == 128 * 1536 * 2048 * 2 <= EXPERT_GROUP_BYTES
