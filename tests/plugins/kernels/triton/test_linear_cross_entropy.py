import itertools

import pytest
import torch
import torch.nn.functional as F

from ftengine.plugins.kernels import reference
from ftengine.plugins.kernels.triton.linear_cross_entropy import PATHS
from ftengine.plugins.kernels.triton.linear_cross_entropy import Plan
from ftengine.plugins.kernels.triton.linear_cross_entropy import choose_path
from ftengine.plugins.kernels.triton.linear_cross_entropy import exp_logits_matmul
from ftengine.plugins.kernels.triton.linear_cross_entropy import linear_cross_entropy
from ftengine.plugins.kernels.triton.linear_cross_entropy import planned
from ftengine.plugins.kernels.triton.linear_cross_entropy.chunks import Work
from ftengine.plugins.kernels.triton.linear_cross_entropy.scale import scaled

from ..helpers import DEVICE
from ..helpers import DTYPES
from ..helpers import check
from ..helpers import leaf
from ..helpers import randn
from ..helpers import run_fwd_bwd


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
    _check(h, w, labels.to(DEVICE), dtype, softcap, weight_grad)


def _plan(path, dtype, chunk_rows=16, vocab=300, tile_rows=128):
    """A plan forcing ``path`` with chunks of at most ``chunk_rows`` rows of ``vocab`` logits."""
    return Plan(chunk_bytes=chunk_rows * vocab * torch.tensor([], dtype=dtype).element_size(), tile_rows=tile_rows,
                path=path)


def _paths(dtype):
    """The paths that take ``dtype`` here: ``two_pass`` for every dtype, ``one_pass`` but for fp16 (its range is too
    narrow), ``epilogue`` for bf16 where its matmul runs (Hopper, or Triton's interpreter)."""
    probe = torch.zeros(8, 16, dtype=dtype, device=DEVICE)
    fits = {"two_pass": True, "one_pass": dtype != torch.float16,
            "epilogue": exp_logits_matmul.supported(probe, probe)}
    return [path for path in PATHS if fits[path]]


def test_choose_path_by_dtype_and_device():
    bf16 = torch.zeros(8, 16, dtype=torch.bfloat16, device=DEVICE)
    assert choose_path(bf16.half(), bf16.half()) == "two_pass"
    assert choose_path(bf16.float(), bf16.float()) == "one_pass"
    assert choose_path(bf16, bf16) == ("epilogue" if exp_logits_matmul.supported(bf16, bf16) else "one_pass")
    assert choose_path(bf16, bf16, Plan(path="two_pass")) == "two_pass"
    with pytest.raises(ValueError, match="unknown path 'three_pass'"):
        choose_path(bf16, bf16, Plan(path="three_pass"))
    with pytest.raises(ValueError, match="epilogue path needs bf16"):
        choose_path(bf16.float(), bf16.float(), Plan(path="epilogue"))


def _check(h, w, labels, dtype, softcap, weight_grad):
    """Loss and gradients against eager PyTorch in ``dtype`` and the fp32 reference."""
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


@pytest.mark.parametrize(("dtype", "path"), [(dtype, path) for dtype in DTYPES for path in _paths(dtype)])
@pytest.mark.parametrize("softcap", [None, 3.0])
@pytest.mark.parametrize("weight_grad", [True, False])
def test_linear_cross_entropy_matches_reference(dtype, softcap, weight_grad, path):
    # several chunks: 37 tokens in chunks of at most 16 rows of logits (13, 13, 11)
    with planned(_plan(path, dtype)):
        _compare(37, 48, 300, dtype, softcap, weight_grad)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n_ignored", [0, 9, 45])
def test_linear_cross_entropy_in_tiled_chunks(dtype, n_ignored):
    """The one-pass path over three chunks in tiles of 8 rows (16 + 16 + the rest), ignored rows left out."""
    with planned(_plan("one_pass", dtype, chunk_rows=20, vocab=301, tile_rows=8)):
        _compare(53, 40, 301, dtype, None, True, gen_seed=4, n_ignored=n_ignored)


@pytest.mark.parametrize("softcap", [None, 40.0])
@pytest.mark.parametrize("path", [path for path in _paths(torch.bfloat16) if path != "two_pass"])
def test_linear_cross_entropy_rows_with_huge_losses(softcap, path):
    """Losses far above the shift's limit (and the epilogue's clamp), the row's maximum in a late block: exact."""
    gen = torch.Generator(device="cpu").manual_seed(5)
    n_tokens, hidden_size, vocab = 12, 32, 2500  # three blocks of the vocabulary under the interpreter
    h = randn((n_tokens, hidden_size), gen, torch.bfloat16)
    growth = torch.linspace(1.0, 8.0, vocab).unsqueeze(1)  # later vocabulary blocks hold the larger logits
    w = randn((vocab, hidden_size), gen, torch.bfloat16, 1.0) * growth.to(DEVICE)
    w = w.to(torch.bfloat16).float()
    labels = torch.randint(0, vocab, (n_tokens,), generator=gen)
    logits = (h.float() @ w.float().t()).cpu()
    labels[::3] = logits[::3].argmin(dim=1)  # losses of hundreds of nats
    labels[1::3] = logits[1::3].argmax(dim=1)  # losses near 0
    labels[7] = -100
    with planned(Plan(path=path)):
        _check(h, w, labels.to(DEVICE), torch.bfloat16, softcap, True)
    losses = F.cross_entropy(logits if softcap is None else softcap * torch.tanh(logits / softcap), labels,
                             reduction="none")
    assert losses.max() > 60  # the shift did move


@pytest.mark.parametrize(("n_rows", "row_bytes"), [(7692, 304128), (8192, 304128), (8192, 256512), (300, 304128)])
def test_chunk_bounds_whole_tiles_under_the_byte_limit(n_rows, row_bytes):
    plan = Plan()
    bounds = plan.bounds(n_rows, plan.rows_per_chunk(row_bytes))
    sizes = [b - a for a, b in itertools.pairwise(bounds)]
    assert bounds[0] == 0 and bounds[-1] == n_rows
    assert all(size * row_bytes <= plan.chunk_bytes for size in sizes)
    assert all(size % plan.tile_rows == 0 for size in sizes[:-1])
    assert max(sizes[:-1], default=0) - min(sizes[:-1], default=0) <= plan.tile_rows  # near-equal
    fewest = -(-n_rows // (plan.chunk_bytes // row_bytes // plan.tile_rows * plan.tile_rows))
    assert len(sizes) == fewest


@pytest.mark.parametrize(("dtype", "out_dtype"), [(torch.bfloat16, None), (torch.float32, torch.bfloat16),
                                                 (torch.float16, None), (torch.float32, None)])
def test_backward_scale_is_the_fp32_product(dtype, out_dtype):
    """The backward's ``x * grad_out`` (a kernel reading the 0-dim upstream gradient) over sizes off the block.

    Within one unit in the last place of the output dtype: Triton's interpreter truncates to bf16.
    """
    gen = torch.Generator(device="cpu").manual_seed(3)
    x = randn((37, 61), gen, dtype).to(dtype)
    scale = torch.tensor(1 / 3, device=DEVICE)
    out = scaled(x, scale, out_dtype)
    want = x.float() * scale
    assert out.dtype == (out_dtype or dtype)
    torch.testing.assert_close(out.float(), want, rtol=torch.finfo(out.dtype).eps, atol=0)


@pytest.mark.parametrize("n_labelled", [0, 5, 16, 17, 40, 53])
def test_chunks_cover_the_labelled_rows_first_one_before_the_count(n_labelled):
    """The first chunk is taken before the count (padded when fewer rows have labels); the others follow it."""
    plan = Plan(chunk_bytes=20 * 301 * 4, tile_rows=8)  # at most 20 rows, in tiles of 8: chunks of 16 for 53 rows
    gen = torch.Generator(device="cpu").manual_seed(7)
    labels = torch.randint(0, 301, (53,), generator=gen)
    labels[torch.randperm(53, generator=gen)[n_labelled:]] = -100
    hidden = randn((53, 4), gen, torch.float32)
    work = Work(hidden, torch.zeros(301, 4, device=DEVICE), labels.to(DEVICE), -100, None, True,
                torch.empty(0), speculate=True, plan=plan)
    chunks = list(work.chunks())
    first_slice, first_rows, first_labels, first_h = chunks[0]
    assert first_slice == slice(0, 16) and first_rows.numel() == 16
    padding = first_rows >= 53
    assert padding.sum() == max(0, 16 - n_labelled)
    assert (first_labels[padding] == -1).all()
    labelled = torch.cat([first_rows[~padding]] + [rows for _, rows, _, _ in chunks[1:]]).cpu()
    assert torch.equal(labelled, (labels != -100).nonzero().squeeze(1))
    for part, rows, chunk_labels, h in chunks:
        assert rows.numel() == part.stop - part.start <= 16
        inside = rows < 53
        assert torch.equal(chunk_labels[inside].cpu(), labels[rows[inside].cpu()])
        assert torch.equal(h[inside], hidden[rows[inside]])
    assert work.n_valid == n_labelled and work.compact == (n_labelled < 53)


def test_linear_cross_entropy_out_of_range_labels_count_as_zero_loss():
    """A label outside the vocabulary (not the ignore index) gets no loss and no gradient, on every path."""
    gen = torch.Generator(device="cpu").manual_seed(6)
    h = randn((24, 32), gen, torch.bfloat16).requires_grad_(True)
    w = randn((64, 32), gen, torch.bfloat16, 0.5)
    labels = torch.randint(0, 64, (24,), generator=gen)
    labels[3], labels[10] = 64, 1000
    labels = labels.to(DEVICE)
    fast = linear_cross_entropy(h, w, labels)
    (fast_grad,) = torch.autograd.grad(fast, h)
    with planned(Plan(path="two_pass")):
        exact = linear_cross_entropy(h, w, labels)
    (exact_grad,) = torch.autograd.grad(exact, h)
    torch.testing.assert_close(fast, exact, rtol=2e-3, atol=1e-4)
    torch.testing.assert_close(fast_grad, exact_grad, rtol=2e-2, atol=2e-4)
    assert fast_grad[3].abs().max() == 0 and fast_grad[10].abs().max() == 0


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
