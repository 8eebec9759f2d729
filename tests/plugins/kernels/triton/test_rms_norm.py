import pytest
import torch

from ftengine.plugins.kernels import reference
from ftengine.plugins.kernels.triton.rms_norm import rms_norm

from ..helpers import DTYPES
from ..helpers import check
from ..helpers import leaf
from ..helpers import randn
from ..helpers import run_fwd_bwd


def _compare(shape, dtype, offset, weight_grad=True, seed=0):
    gen = torch.Generator(device="cpu").manual_seed(seed)
    h = shape[-1]
    x = randn(shape, gen, dtype, 2.0, 0.3)
    w = randn(h, gen, dtype, 0.5, 0.0 if offset else 1.0)
    dy = randn(shape, gen, dtype)
    eps = 1e-6

    def inputs(dt):
        return [leaf(x, dt), leaf(w, dt).requires_grad_(weight_grad)]

    def fn(impl):
        return lambda a, b: impl(a, b, eps, offset)

    (y,), grads = run_fwd_bwd(fn(rms_norm), inputs(dtype), dy, poison=True)
    (y_ref,), grads_ref = run_fwd_bwd(fn(reference.rms_norm), inputs(dtype), dy)
    (y_true,), grads_true = run_fwd_bwd(fn(reference.rms_norm), inputs(torch.float32), dy)
    check(y, y_ref, y_true, dtype, "y")
    check(grads[0], grads_ref[0], grads_true[0], dtype, "dx")
    if weight_grad:
        check(grads[1], grads_ref[1], grads_true[1], dtype, "dweight")
    else:
        assert grads[1] is None


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(37, 129), (2, 9, 64), (5, 1000)])
@pytest.mark.parametrize("offset", [0.0, 1.0])
def test_rms_norm_matches_reference(shape, dtype, offset):
    _compare(shape, dtype, offset)


def test_rms_norm_frozen_weight():
    _compare((13, 77), torch.float32, 0.0, weight_grad=False)


@pytest.mark.gpu
@pytest.mark.parametrize("hidden", [4096, 3584])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_rms_norm_real_shapes(hidden, dtype):
    _compare((8192, hidden), dtype, 0.0)
    _compare((3, 1000, hidden), dtype, 1.0, seed=1)
