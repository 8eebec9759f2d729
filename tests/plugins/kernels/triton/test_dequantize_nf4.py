import copy

import pytest
import torch

from ftengine.plugins.kernels import reference
from ftengine.plugins.kernels.triton.dequantize_nf4 import dequantize_nf4

from ..helpers import DEVICE
from ..helpers import poisoned_allocations

bnb_functional = pytest.importorskip("bitsandbytes.functional")


def _expected(packed, state):
    """bitsandbytes' own dequantization.

    On the CPU, bitsandbytes 0.50.2's native kernel mis-reads rows whose length is not a multiple
    of the blocksize (its own round trip then errs ~3x more than NF4 does), while the layout its
    quantizer writes, and its CUDA kernel reads, is flat. So there it dequantizes the same bytes
    viewed as rows of one block each (every test shape holds a whole number of blocks).
    """
    if packed.is_cuda:
        return bnb_functional.dequantize_4bit(packed, state)
    flat = copy.copy(state)
    n = state.shape.numel()
    assert n % state.blocksize == 0
    flat.shape = torch.Size((n // state.blocksize, state.blocksize))
    return bnb_functional.dequantize_4bit(packed, flat).reshape(state.shape)


def _quantize(shape, dtype, nested, blocksize, seed=0):
    gen = torch.Generator(device="cpu").manual_seed(seed)
    w = (torch.randn(shape, generator=gen) * 0.05).to(dtype).to(DEVICE)
    return bnb_functional.quantize_4bit(w, quant_type="nf4", compress_statistics=nested, blocksize=blocksize)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("nested", [True, False])
@pytest.mark.parametrize("shape", [(96, 130), (64, 33), (7, 64)])
def test_dequantize_nf4_bit_identical_to_bitsandbytes(shape, dtype, nested):
    packed, state = _quantize(shape, dtype, nested, 64)
    expected = _expected(packed, state)
    with poisoned_allocations():
        ours = dequantize_nf4(packed, state)
    assert ours.dtype == expected.dtype and ours.shape == expected.shape
    assert torch.equal(ours, expected)


@pytest.mark.parametrize("blocksize", [128, 256])
def test_dequantize_nf4_other_blocksizes(blocksize):
    packed, state = _quantize((64, 200), torch.bfloat16, True, blocksize, seed=1)
    assert torch.equal(dequantize_nf4(packed, state), _expected(packed, state))


@pytest.mark.parametrize("nested", [True, False])
def test_reference_dequantize_nf4_bit_identical_to_bitsandbytes(nested):
    packed, state = _quantize((130, 96), torch.bfloat16, nested, 64, seed=2)
    assert torch.equal(reference.dequantize_nf4(packed, state), _expected(packed, state))


@pytest.mark.gpu
@pytest.mark.parametrize("shape", [(14336, 4096), (4096, 14336), (18944, 3584)])
def test_dequantize_nf4_real_shapes(shape):
    packed, state = _quantize(shape, torch.bfloat16, True, 64)
    expected = _expected(packed, state)
    assert torch.equal(dequantize_nf4(packed, state), expected)
    assert torch.equal(reference.dequantize_nf4(packed, state), expected)


def test_dequantize_nf4_odd_element_count():
    packed, state = _quantize((5, 7), torch.bfloat16, True, 64, seed=3)  # 35 values: the last byte is half used
    expected = bnb_functional.dequantize_4bit(packed, state)  # odd rows take bitsandbytes' generic path on the CPU
    with poisoned_allocations():
        assert torch.equal(dequantize_nf4(packed, state), expected)


@pytest.mark.parametrize("storage", [torch.bfloat16, torch.float32])
def test_dequantize_nf4_of_bytes_stored_as_another_dtype(storage):
    """bitsandbytes' ``quant_storage`` (what FSDP shards) holds the same bytes as a float dtype: both
    backends read them as the uint8 layout, bitsandbytes' dequantization of that storage is the reference."""
    gen = torch.Generator(device="cpu").manual_seed(4)
    w = (torch.randn(96, 128, generator=gen) * 0.05).to(torch.bfloat16).to(DEVICE)
    packed, state = bnb_functional.quantize_4bit(w, quant_type="nf4", compress_statistics=True, blocksize=64,
                                                 quant_storage=storage)
    assert packed.dtype == storage
    expected = _expected(packed, state)
    assert torch.equal(dequantize_nf4(packed, state), expected)
    assert torch.equal(reference.dequantize_nf4(packed, state), expected)
