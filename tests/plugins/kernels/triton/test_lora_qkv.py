import pytest
import torch

from ftengine.plugins.kernels import reference
from ftengine.plugins.kernels.triton.lora_qkv import lora_qkv

from ..helpers import DTYPES
from ..helpers import check
from ..helpers import poisoned_allocations
from ..helpers import randn
from ..lora_cases import clone_layer
from ..lora_cases import make_layer
from ..lora_cases import trainable


def _compare(shape, outs, ranks, dtype, nf4=False, bias=False, x_grad=True, seed=0, frozen=()):
    if nf4:
        pytest.importorskip("bitsandbytes")
    gen = torch.Generator(device="cpu").manual_seed(seed)
    layers = [make_layer(shape[-1], o, r, dtype, gen, nf4=nf4, bias=bias) for o, r in zip(outs, ranks, strict=False)]
    for i, name in frozen:  # e.g. (0, "lora_a"): that tensor gets no gradient
        getattr(layers[i], name).requires_grad_(False)
    x = randn(shape, gen, dtype)
    dys = [randn((*shape[:-1], o), gen, dtype) for o in outs]

    def run(impl, dt, poison):
        lays = [clone_layer(layer, None if dt == dtype else dt) for layer in layers]
        xi = x.to(dt).requires_grad_(x_grad)
        with poisoned_allocations() if poison else torch.enable_grad():
            ys = impl(xi, *lays)
            torch.autograd.backward(ys, [d.to(y.dtype) for d, y in zip(dys, ys, strict=False)])
        return ys, xi.grad, [t.grad for lay in lays for _, t in trainable(lay)]

    ys, dx, grads = run(lora_qkv, dtype, True)
    ys_r, dx_r, grads_r = run(reference.lora_qkv, dtype, False)
    ys_t, dx_t, grads_t = run(reference.lora_qkv, torch.float32, False)
    for name, y, y_r, y_t in zip("qkv", ys, ys_r, ys_t, strict=False):
        check(y, y_r, y_t, dtype, name)
    if x_grad:
        check(dx, dx_r, dx_t, dtype, "dx")
    else:
        assert dx is None
    names = [f"{'qkv'[i]}.{n}" for i, lay in enumerate(layers) for n, _ in trainable(lay)]
    assert len(grads) == len(names)
    for name, g, g_r, g_t in zip(names, grads, grads_r, grads_t, strict=False):
        check(g, g_r, g_t.to(g_r.dtype), dtype, name)


@pytest.mark.parametrize("dtype", DTYPES)
def test_lora_qkv_matches_reference(dtype):
    _compare((2, 7, 48), (48, 16, 16), (4, 4, 4), dtype)


def test_lora_qkv_mixed_ranks_bias_missing_adapter():
    _compare((11, 40), (40, 24, 24), (3, None, 6), torch.float32, bias=True)


@pytest.mark.parametrize("frozen", [((0, "lora_a"), (2, "lora_b")), ((0, "lora_a"), (1, "lora_a"), (2, "lora_a"))])
def test_lora_qkv_partly_frozen_adapters(frozen):
    # one frozen A: x is kept and xa recomputed; every A frozen: xa itself is kept
    _compare((2, 5, 32), (32, 8, 8), (3, 2, 4), torch.float32, frozen=frozen)


def test_lora_qkv_frozen_input():
    _compare((9, 32), (32, 8, 8), (2, 2, 2), torch.bfloat16, x_grad=False)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_lora_qkv_nf4_base(dtype):
    _compare((13, 64), (64, 128, 128), (4, 4, 4), dtype, nf4=True)


@pytest.mark.gpu
@pytest.mark.parametrize("sizes", [(4096, 4096, 1024), (3584, 3584, 512)])
@pytest.mark.parametrize("nf4", [False, True])
def test_lora_qkv_real_shapes(sizes, nf4):
    _compare((8192, sizes[0]), (sizes[1], sizes[2], sizes[2]), (16, 16, 16), torch.bfloat16, nf4=nf4)
