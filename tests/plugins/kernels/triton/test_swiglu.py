import pytest
import torch

from ftengine.plugins.kernels import reference
from ftengine.plugins.kernels.triton.swiglu import swiglu

from ..helpers import DEVICE
from ..helpers import DTYPES
from ..helpers import check
from ..helpers import leaf
from ..helpers import randn
from ..helpers import run_fwd_bwd


def compare_gated(op, ref_op, shape, dtype, intermediates, seed=0):
    """Output and both gradients of a gated activation vs the reference.

    With ``intermediates`` the op sees non-leaf inputs (as in a model, where its backward may
    write the gradients over them); the gradients are then read at the leaves behind them.
    """
    gen = torch.Generator(device="cpu").manual_seed(seed)
    g = randn(shape, gen, dtype, 3.0)
    u = randn(shape, gen, dtype)
    dy = randn(shape, gen, dtype)

    def run(impl, dt, poison):
        a, b = leaf(g, dt), leaf(u, dt)
        fn = (lambda p, q: impl(p * 1, q * 1)) if intermediates else impl
        (y,), grads = run_fwd_bwd(fn, [a, b], dy, poison=poison)
        return y, grads

    y, (dg, du) = run(op, dtype, True)
    y_ref, (dg_ref, du_ref) = run(ref_op, dtype, False)
    y_true, (dg_true, du_true) = run(ref_op, torch.float32, False)
    check(y, y_ref, y_true, dtype, "y")
    check(dg, dg_ref, dg_true, dtype, "dgate")
    check(du, du_ref, du_true, dtype, "dup")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(3, 37, 129), (1000,)])
@pytest.mark.parametrize("intermediates", [False, True])
def test_swiglu_matches_reference(shape, dtype, intermediates):
    compare_gated(swiglu, reference.swiglu, shape, dtype, intermediates)


def test_swiglu_same_tensor_twice():
    x = torch.randn(7, 33, device=DEVICE).requires_grad_(True)
    x_ref = x.detach().clone().requires_grad_(True)
    y = swiglu(x * 1, x * 1)
    y.sum().backward()
    xr = x_ref * 1
    reference.swiglu(xr, xr).sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-5, atol=1e-5)


def test_swiglu_noncontiguous_inputs():
    gu = torch.randn(9, 2 * 45, device=DEVICE, requires_grad=True)
    gu_ref = gu.detach().clone().requires_grad_(True)
    dy = torch.randn(9, 45, device=DEVICE)
    g, u = (gu * 1).chunk(2, dim=-1)
    swiglu(g, u).backward(dy)
    g, u = gu_ref.chunk(2, dim=-1)
    reference.swiglu(g, u).backward(dy)
    torch.testing.assert_close(gu.grad, gu_ref.grad, rtol=1e-5, atol=1e-5)


@pytest.mark.gpu
@pytest.mark.parametrize("inter", [14336, 18944])
def test_swiglu_real_shapes(inter):
    compare_gated(swiglu, reference.swiglu, (8192, inter), torch.bfloat16, True)
