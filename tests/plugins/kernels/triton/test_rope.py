import pytest
import torch

from ftengine.plugins.kernels import reference
from ftengine.plugins.kernels.triton.rope import rope

from ..helpers import DEVICE
from ..helpers import DTYPES
from ..helpers import check
from ..helpers import leaf
from ..helpers import randn
from ..helpers import run_fwd_bwd


def _tables(batch, seq, dim, gen, batched):
    inv = 1.0 / (10000 ** (torch.arange(0, dim, 2).float() / dim))
    pos = torch.randint(0, 4096, (batch if batched else 1, seq), generator=gen).float()
    freqs = pos[..., None] * inv  # (B, T, D/2)
    emb = torch.cat((freqs, freqs), dim=-1)
    cos, sin = emb.cos(), emb.sin()
    if not batched:
        cos, sin = cos[0], sin[0]  # (T, D)
    return cos.to(DEVICE), sin.to(DEVICE)


def _compare(batch, n_q, n_k, seq, dim, dtype, batched, transposed, seed=0):
    gen = torch.Generator(device="cpu").manual_seed(seed)
    q = randn((batch, n_q, seq, dim), gen, dtype)
    k = randn((batch, n_k, seq, dim), gen, dtype)
    dq = randn((batch, n_q, seq, dim), gen, dtype)
    dk = randn((batch, n_k, seq, dim), gen, dtype)
    cos, sin = (t.to(dtype).float() for t in _tables(batch, seq, dim, gen, batched))

    def run(impl, dt, poison):
        a, b = leaf(q, dt), leaf(k, dt)
        c, s = cos.to(dt), sin.to(dt)
        if transposed:  # as a model produces them: (B, T, H, D) viewed as (B, H, T, D)
            a = leaf(q.transpose(1, 2).contiguous(), dt)
            b = leaf(k.transpose(1, 2).contiguous(), dt)

            def fn(x, y):
                return impl(x.transpose(1, 2), y.transpose(1, 2), c, s)

            outs, grads = run_fwd_bwd(fn, [a, b], (dq, dk), poison=poison)
            return outs, [g.transpose(1, 2) for g in grads]
        return run_fwd_bwd(lambda x, y: impl(x, y, c, s), [a, b], (dq, dk), poison=poison)

    (qo, ko), (gq, gk) = run(rope, dtype, True)
    (qo_r, ko_r), (gq_r, gk_r) = run(reference.rope, dtype, False)
    (qo_t, ko_t), (gq_t, gk_t) = run(reference.rope, torch.float32, False)
    if transposed:  # the outputs keep the inputs' (B, T, H, D) memory layout: no copies
        assert qo.transpose(1, 2).is_contiguous() and ko.transpose(1, 2).is_contiguous()
    check(qo, qo_r, qo_t, dtype, "q_out")
    check(ko, ko_r, ko_t, dtype, "k_out")
    check(gq, gq_r, gq_t, dtype, "dq")
    check(gk, gk_r, gk_t, dtype, "dk")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("batched", [True, False])
@pytest.mark.parametrize("transposed", [False, True])
def test_rope_matches_reference(dtype, batched, transposed):
    _compare(2, 6, 2, 7, 24, dtype, batched, transposed)


def test_rope_odd_head_counts():
    _compare(1, 5, 3, 9, 10, torch.float32, True, False)


def test_rope_rejects_odd_head_dim():
    q = torch.randn(1, 2, 3, 5)
    with pytest.raises(ValueError, match="even D"):
        rope(q, q, torch.randn(3, 5), torch.randn(3, 5))


@pytest.mark.gpu
@pytest.mark.parametrize("heads", [(32, 8), (28, 4)])
def test_rope_real_shapes(heads):
    _compare(4, heads[0], heads[1], 2048, 128, torch.bfloat16, False, True)
    _compare(2, heads[0], heads[1], 1000, 128, torch.bfloat16, True, False, seed=1)
