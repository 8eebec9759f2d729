import pytest
import torch

from ftengine.plugins.kernels import reference
from ftengine.plugins.kernels.triton.lora_mlp import lora_mlp

from ..helpers import DTYPES
from ..helpers import check
from ..helpers import poisoned_allocations
from ..helpers import randn
from ..lora_cases import clone_layer
from ..lora_cases import make_layer
from ..lora_cases import trainable


def _compare(shape, inter, ranks, dtype, activation="swiglu", nf4=False, bias=False, x_grad=True, seed=0,
             frozen=()):
    if nf4:
        pytest.importorskip("bitsandbytes")
    gen = torch.Generator(device="cpu").manual_seed(seed)
    hidden = shape[-1]
    layers = [
        make_layer(hidden, inter, ranks[0], dtype, gen, nf4=nf4, bias=bias),
        make_layer(hidden, inter, ranks[1], dtype, gen, nf4=nf4, bias=bias),
        make_layer(inter, hidden, ranks[2], dtype, gen, nf4=nf4, bias=bias),
    ]
    for i, name in frozen:  # e.g. (0, "lora_a"): that tensor gets no gradient
        getattr(layers[i], name).requires_grad_(False)
    x = randn(shape, gen, dtype)
    dy = randn(shape, gen, dtype)

    def run(impl, dt, poison):
        lays = [clone_layer(layer, None if dt == dtype else dt) for layer in layers]
        xi = x.to(dt).requires_grad_(x_grad)
        with poisoned_allocations() if poison else torch.enable_grad():
            y = impl(xi, *lays, activation=activation)
            y.backward(dy.to(y.dtype))
        return y, xi.grad, [t.grad for lay in lays for _, t in trainable(lay)]

    y, dx, grads = run(lora_mlp, dtype, True)
    y_r, dx_r, grads_r = run(reference.lora_mlp, dtype, False)
    y_t, dx_t, grads_t = run(reference.lora_mlp, torch.float32, False)
    check(y, y_r, y_t, dtype, "y")
    if x_grad:
        check(dx, dx_r, dx_t, dtype, "dx")
    else:
        assert dx is None
    names = [f"{i}.{n}" for i, lay in enumerate(layers) for n, _ in trainable(lay)]
    assert len(grads) == len(names)
    for name, g, g_r, g_t in zip(names, grads, grads_r, grads_t, strict=False):
        check(g, g_r, g_t.to(g_r.dtype), dtype, name)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("activation", ["swiglu", "geglu", "geglu_tanh"])
def test_lora_mlp_matches_reference(dtype, activation):
    _compare((3, 5, 40), 72, (4, 4, 4), dtype, activation)


def test_lora_mlp_bias_partial_adapters_frozen_input():
    _compare((13, 24), 56, (3, None, 5), torch.float32, bias=True, x_grad=False)


@pytest.mark.parametrize("frozen", [((0, "lora_a"), (1, "lora_b"), (2, "lora_b")),
                                    ((0, "lora_a"), (1, "lora_a"), (2, "lora_a"))])
def test_lora_mlp_partly_frozen_adapters(frozen):
    _compare((7, 24), 40, (3, 3, 3), torch.float32, frozen=frozen)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_lora_mlp_nf4_base(dtype):
    _compare((9, 64), 128, (4, 4, 4), dtype, nf4=True)


@pytest.mark.parametrize("case", [
    dict(dtype=torch.float32, bias=True, ranks=(3, None, 5)),
    dict(dtype=torch.bfloat16, activation="geglu_tanh"),
    dict(dtype=torch.float32, frozen=((0, "lora_a"), (1, "lora_a"), (2, "lora_b")), x_grad=False),
    dict(dtype=torch.bfloat16, nf4=True),
])
def test_lora_mlp_long_sequence_chunks(case, monkeypatch):
    # g and u over the limit: only x is kept, the backward recomputes them 16 rows (CHUNK_BYTES) at a time
    _compare_in_chunks(case, monkeypatch, SAVE_LIMIT_BYTES=0, CHUNK_BYTES=16)


def _compare_in_chunks(case: dict, monkeypatch, **limits: int) -> None:
    """``_compare`` on 42 rows of 64 features, with the module's byte limits set to ``limits`` rows of (N, I)."""
    from ftengine.plugins.kernels.triton import lora_mlp as module

    case = dict(case)
    inter, dtype, ranks = 64, case.pop("dtype"), case.pop("ranks", (4, 4, 4))
    row_bytes = inter * torch.tensor([], dtype=dtype).element_size()
    for name, rows in limits.items():
        monkeypatch.setattr(module, name, rows * row_bytes)
    _compare((2, 21, 64), inter, ranks, dtype, **case)


def test_lora_mlp_long_sequence_keeps_only_x(monkeypatch):
    from ftengine.plugins.kernels.triton import lora_mlp as module

    gen = torch.Generator(device="cpu").manual_seed(5)
    layers = [make_layer(8, 16, 2, torch.float32, gen), make_layer(8, 16, 2, torch.float32, gen),
              make_layer(16, 8, 2, torch.float32, gen)]
    x = randn((20, 8), gen, torch.float32).requires_grad_(True)
    assert lora_mlp(x, *layers).grad_fn.chunk is None  # short: g and u saved
    monkeypatch.setattr(module, "SAVE_LIMIT_BYTES", 2 * 20 * 16 * 4 - 1)
    monkeypatch.setattr(module, "CHUNK_BYTES", 6 * 16 * 4)
    y = lora_mlp(x, *layers)
    x_kept, g, u = y.grad_fn.saved_tensors[:3]
    assert y.grad_fn.chunk == 6 and x_kept is not None and g is None and u is None


def test_lora_mlp_backward_runs_once():
    gen = torch.Generator(device="cpu").manual_seed(0)
    layers = [make_layer(8, 16, 2, torch.float32, gen), make_layer(8, 16, 2, torch.float32, gen),
              make_layer(16, 8, 2, torch.float32, gen)]
    y = lora_mlp(randn((3, 8), gen, torch.float32).requires_grad_(True), *layers)
    y.sum().backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="only once"):
        y.sum().backward()


def test_lora_mlp_rejects_unknown_activation():
    gen = torch.Generator(device="cpu").manual_seed(0)
    layer = make_layer(4, 4, None, torch.float32, gen)
    with pytest.raises(ValueError, match="activation"):
        lora_mlp(torch.randn(2, 4), layer, layer, layer, activation="relu")


@pytest.mark.gpu
@pytest.mark.parametrize("sizes", [(4096, 14336), (3584, 18944)])
@pytest.mark.parametrize("nf4", [False, True])
def test_lora_mlp_real_shapes(sizes, nf4):
    _compare((8192, sizes[0]), sizes[1], (16, 16, 16), torch.bfloat16, nf4=nf4)


@pytest.mark.parametrize("case", [
    dict(dtype=torch.float32, bias=True, ranks=(3, None, 5)),
    dict(dtype=torch.bfloat16, activation="geglu"),
    dict(dtype=torch.float32, frozen=((2, "lora_a"),)),
    dict(dtype=torch.float32, frozen=((2, "lora_b"),)),
    dict(dtype=torch.bfloat16, nf4=True),
])
def test_lora_mlp_activation_gradient_in_row_chunks(case, monkeypatch):
    # dh = dy W_d + ... made 8 rows (DH_CHUNK_BYTES) at a time; 42 rows: five chunks and a short last one
    _compare_in_chunks(case, monkeypatch, DH_CHUNK_BYTES=8)


def test_lora_mlp_recomputation_saves_without_computing_the_output(monkeypatch):
    # in a checkpoint's recomputation only g and u (what the backward reads) are made: no activation, no down GEMM
    from ftengine.core.kernels import recomputation
    from ftengine.plugins.kernels.triton import lora_mlp as module

    gen = torch.Generator(device="cpu").manual_seed(3)
    layers = [make_layer(8, 16, 2, torch.float32, gen), make_layer(8, 16, 2, torch.float32, gen),
              make_layer(16, 8, 2, torch.float32, gen)]
    x = randn((5, 8), gen, torch.float32).requires_grad_(True)
    saved = [t for t in lora_mlp(x, *layers).grad_fn.saved_tensors if t is not None]
    activations, act_forward = [], module._act_forward
    monkeypatch.setattr(module, "_act_forward", lambda *a: activations.append(1) or act_forward(*a))
    with recomputation():
        y = lora_mlp(x, *layers)
        with torch.no_grad():
            assert lora_mlp(x, *layers).shape == (5, 8)  # no autograd: a plain forward, which calls the activation
    assert y.shape == (5, 8) and y.dtype == x.dtype and activations == [1]
    resaved = [t for t in y.grad_fn.saved_tensors if t is not None]
    assert len(resaved) == len(saved)
    for a, b in zip(saved, resaved, strict=True):
        torch.testing.assert_close(a, b)
