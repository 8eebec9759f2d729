import pytest
import torch

from ftengine.plugins.kernels import reference
from ftengine.plugins.kernels.triton.lora_linear import lora_linear

from ..helpers import DTYPES
from ..helpers import check
from ..helpers import poisoned_allocations
from ..helpers import randn
from ..lora_cases import clone_layer
from ..lora_cases import make_layer
from ..lora_cases import trainable


def _call(impl, x, layer):
    return impl(x, layer.weight, layer.lora_a, layer.lora_b, layer.scaling, layer.bias, layer.quant_state)


def _compare(shape, d_out, rank, dtype, nf4=False, bias=False, x_grad=True, adapter_dtype=None, seed=0, frozen=()):
    if nf4:
        pytest.importorskip("bitsandbytes")
    gen = torch.Generator(device="cpu").manual_seed(seed)
    layer = make_layer(shape[-1], d_out, rank, dtype, gen, nf4=nf4, bias=bias, adapter_dtype=adapter_dtype)
    for name in frozen:  # "lora_a" / "lora_b": that tensor gets no gradient
        getattr(layer, name).requires_grad_(False)
    x = randn(shape, gen, dtype)
    dy = randn((*shape[:-1], d_out), gen, dtype)

    def run(impl, dt, poison):
        lay = clone_layer(layer, None if dt == dtype else dt)
        xi = x.to(dt).requires_grad_(x_grad)
        with poisoned_allocations() if poison else torch.enable_grad():
            y = _call(impl, xi, lay)
            y.backward(dy.to(y.dtype))
        return y, xi.grad, [t.grad for _, t in trainable(lay)]

    y, dx, grads = run(lora_linear, dtype, True)
    y_r, dx_r, grads_r = run(reference.lora_linear, dtype, False)
    y_t, dx_t, grads_t = run(reference.lora_linear, torch.float32, False)
    check(y, y_r, y_t, dtype, "y")
    if x_grad:
        check(dx, dx_r, dx_t, dtype, "dx")
    else:
        assert dx is None
    for (name, _), g, g_r, g_t in zip(trainable(layer), grads, grads_r, grads_t, strict=False):
        check(g, g_r, g_t.to(g_r.dtype), dtype, name)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bias", [False, True])
def test_lora_linear_matches_reference(dtype, bias):
    _compare((2, 7, 48), 40, 5, dtype, bias=bias)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_lora_linear_nf4_base(dtype):
    _compare((19, 64), 96, 3, dtype, nf4=True)


def test_lora_linear_frozen_input_and_fp32_adapters():
    _compare((11, 48), 33, 4, torch.bfloat16, x_grad=False, adapter_dtype=torch.float32)


@pytest.mark.parametrize("frozen", [("lora_a",), ("lora_b",)])
def test_lora_linear_partly_frozen_adapter(frozen):
    _compare((6, 40), 24, 3, torch.float32, frozen=frozen)


def test_lora_linear_without_adapter():
    _compare((5, 3, 24), 17, None, torch.float32, bias=True)


def test_lora_linear_rejects_trainable_base():
    w = torch.randn(4, 3, requires_grad=True)
    with pytest.raises(ValueError, match="frozen"):
        lora_linear(torch.randn(2, 3), w, None, None, 1.0)


@pytest.mark.gpu
@pytest.mark.parametrize("nf4", [False, True])
def test_lora_linear_real_shapes(nf4):
    _compare((8192, 4096), 14336, 16, torch.bfloat16, nf4=nf4)


def test_adapter_compute_copies_are_reused_within_a_forward_and_refreshed_after():
    from ftengine.core.kernels import begin_forward
    from ftengine.plugins.kernels.triton.lora_linear import compute_copy
    from ftengine.plugins.kernels.triton.lora_linear import stacked_copy

    a = torch.nn.Parameter(torch.randn(4, 8))
    b = torch.nn.Parameter(torch.randn(3, 8))
    begin_forward()
    first = compute_copy(a, torch.bfloat16)
    assert first.dtype == torch.bfloat16 and torch.equal(first, a.detach().to(torch.bfloat16))
    assert compute_copy(a, torch.bfloat16) is first  # the recomputation and the backward reuse it
    assert compute_copy(a, torch.float32) is a
    stack = stacked_copy([a, b], torch.bfloat16)
    assert torch.equal(stack, torch.cat([a, b]).detach().to(torch.bfloat16))
    assert stacked_copy([a, b], torch.bfloat16) is stack

    with torch.no_grad():  # an optimizer step: in place, the version moves
        a.add_(1.0)
    assert torch.equal(compute_copy(a, torch.bfloat16), a.detach().to(torch.bfloat16))
    assert torch.equal(stacked_copy([a, b], torch.bfloat16), torch.cat([a, b]).detach().to(torch.bfloat16))

    a.data.copy_(torch.zeros(4, 8))  # invisible to the version counter: the next forward recasts
    begin_forward()
    assert torch.equal(compute_copy(a, torch.bfloat16), torch.zeros(4, 8, dtype=torch.bfloat16))
