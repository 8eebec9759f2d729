import pytest
import torch
import torch.nn.functional as F

from ftengine.plugins.kernels import reference
from ftengine.plugins.kernels.triton import linear_cross_entropy as lce_module
from ftengine.plugins.kernels.triton.linear_cross_entropy import linear_cross_entropy

from .helpers import DEVICE
from .helpers import DTYPES
from .helpers import check
from .helpers import leaf
from .helpers import randn
from .helpers import run_fwd_bwd


def _plain_torch(hidden, weight, labels, ignore_index=-100, softcap=None):
    """Everything in the inputs' dtype, as eager PyTorch would do it: the low-precision baseline."""
    logits = hidden @ weight.t()
    if softcap:
        logits = softcap * torch.tanh(logits / softcap)
    return F.cross_entropy(logits.float(), labels, ignore_index=ignore_index)


def _compare(n_tokens, hidden_size, vocab, dtype, softcap, weight_grad, gen_seed=0, n_ignored=5):
    gen = torch.Generator(device="cpu").manual_seed(gen_seed)
    h = randn((n_tokens, hidden_size), gen, dtype)
    w = randn((vocab, hidden_size), gen, dtype, 0.5)
    labels = torch.randint(0, vocab, (n_tokens,), generator=gen)
    labels[torch.randperm(n_tokens, generator=gen)[:n_ignored]] = -100
    labels = labels.to(DEVICE)
    grad_out = torch.tensor(1.7, device=DEVICE)

    def run(impl, dt, poison):
        inputs = [leaf(h, dt), leaf(w, dt).requires_grad_(weight_grad)]
        (loss,), grads = run_fwd_bwd(lambda a, b: impl(a, b, labels, -100, softcap), inputs, grad_out, poison=poison)
        return loss, grads

    loss, (dh, dw) = run(linear_cross_entropy, dtype, True)
    baseline = _plain_torch if dtype != torch.float32 else reference.linear_cross_entropy
    loss_b, (dh_b, dw_b) = run(baseline, dtype, False)
    loss_t, (dh_t, dw_t) = run(reference.linear_cross_entropy, torch.float32, False)
    assert loss.dtype == torch.float32 and loss.dim() == 0
    check(loss, loss_b, loss_t, dtype, "loss")
    check(dh, dh_b, dh_t, dtype, "dhidden")
    if weight_grad:
        check(dw, dw_b, dw_t, dtype, "dweight")
    else:
        assert dw is None


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("softcap", [None, 3.0])
@pytest.mark.parametrize("weight_grad", [True, False])
def test_linear_cross_entropy_matches_reference(dtype, softcap, weight_grad, monkeypatch):
    vocab = 300
    # several chunks: 37 tokens in chunks of at most 16 rows of logits (13, 13, 11)
    monkeypatch.setattr(lce_module, "CHUNK_BYTES", 16 * vocab * torch.tensor([], dtype=dtype).element_size())
    _compare(37, 48, vocab, dtype, softcap, weight_grad)


def test_linear_cross_entropy_all_ignored():
    h = torch.randn(6, 16, device=DEVICE, requires_grad=True)
    w = torch.randn(50, 16, device=DEVICE)
    labels = torch.full((6,), -100, device=DEVICE)
    loss = linear_cross_entropy(h, w, labels)
    loss.backward()
    assert loss.item() == 0.0
    assert torch.equal(h.grad, torch.zeros_like(h))


def test_linear_cross_entropy_batched_input():
    gen = torch.Generator(device="cpu").manual_seed(3)
    h = randn((2, 5, 16), gen, torch.float32).requires_grad_(True)
    w = randn((70, 16), gen, torch.float32)
    labels = torch.randint(0, 70, (2, 5), generator=gen).to(DEVICE)
    loss = linear_cross_entropy(h, w, labels)
    ref = reference.linear_cross_entropy(h, w, labels)
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-6)


@pytest.mark.gpu
@pytest.mark.parametrize("sizes", [(4096, 128256), (3584, 152064)])
def test_linear_cross_entropy_real_shapes(sizes):
    hidden_size, vocab = sizes
    _compare(8192, hidden_size, vocab, torch.bfloat16, None, False, n_ignored=1000)
    _compare(1000, hidden_size, vocab, torch.bfloat16, 30.0, True, gen_seed=1, n_ignored=100)
