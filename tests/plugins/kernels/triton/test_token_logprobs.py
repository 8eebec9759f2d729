"""``token_logprobs``, reference and Triton, against the full-logits float64 computation: values,
statistics, and the gradients of hidden and weight through softcap and temperature; neither ever
holds a whole (N, V) logits tensor."""

from __future__ import annotations

import pytest
import torch

from ftengine.plugins.kernels import reference
from ftengine.plugins.kernels.triton import token_logprobs as triton_module

from ..helpers import DEVICE
from ..helpers import rel_err

OPS = {"reference": reference.token_logprobs, "triton": triton_module.token_logprobs}


def float64_truth(hidden, weight, labels, softcap, temperature):
    z = hidden.double() @ weight.double().t()
    if softcap:
        z = softcap * torch.tanh(z / softcap)
    s = z / temperature
    logp_all = torch.log_softmax(s, dim=-1)
    logp = logp_all.gather(1, labels.unsqueeze(1)).squeeze(1)
    entropy = -(logp_all.exp() * logp_all).sum(-1)
    stats = torch.stack([entropy, s.mean(-1), (s.argmax(-1) == labels).double()], dim=1)
    return logp, stats


def inputs(n, hidden_size, vocab, seed=0):
    gen = torch.Generator().manual_seed(seed)
    h = torch.randn(n, hidden_size, generator=gen).to(DEVICE)
    w = (torch.randn(vocab, hidden_size, generator=gen) * 0.5).to(DEVICE)
    labels = torch.randint(0, vocab, (n,), generator=gen).to(DEVICE)
    return h, w, labels


@pytest.mark.parametrize("backend", list(OPS))
@pytest.mark.parametrize("softcap,temperature", [(None, 1.0), (None, 0.7), (8.0, 1.3)])
def test_matches_float64_full_logits(backend, softcap, temperature, monkeypatch):
    # several chunks, the last one partial: 3 rows per chunk over 10 rows
    monkeypatch.setattr(reference, "LOGPROB_CHUNK_ELEMENTS", 3 * 200)
    h, w, labels = inputs(10, 32, 200)
    g = torch.randn(10, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    h64, w64 = h.double().requires_grad_(), w.double().requires_grad_()
    truth, truth_stats = float64_truth(h64, w64, labels, softcap, temperature)
    (truth * g.double()).sum().backward()

    hx, wx = h.clone().requires_grad_(), w.clone().requires_grad_()
    logp, stats = OPS[backend](hx, wx, labels, softcap=softcap, temperature=temperature, with_stats=True)
    (logp * g).sum().backward()
    assert logp.dtype == torch.float32 and logp.shape == (10,) and not stats.requires_grad
    assert rel_err(logp, truth) < 1e-5
    assert rel_err(stats[:, :2], truth_stats[:, :2]) < 1e-5 and torch.equal(stats[:, 2].double(), truth_stats[:, 2])
    assert rel_err(hx.grad, h64.grad) < 1e-5 and rel_err(wx.grad, w64.grad) < 1e-5


@pytest.mark.parametrize("backend", list(OPS))
def test_without_stats_returns_only_the_log_probabilities(backend):
    h, w, labels = inputs(5, 16, 64, seed=3)
    logp = OPS[backend](h, w, labels)
    assert isinstance(logp, torch.Tensor) and rel_err(logp, float64_truth(h, w, labels, None, 1.0)[0]) < 1e-5


def test_reference_never_builds_the_whole_logits(monkeypatch):
    monkeypatch.setattr(reference, "LOGPROB_CHUNK_ELEMENTS", 4 * 100)
    h, w, labels = inputs(12, 16, 100, seed=2)
    h.requires_grad_()
    largest = []
    real_matmul = torch.Tensor.__matmul__

    def recording(a, b):
        out = real_matmul(a, b)
        largest.append(out.numel())
        return out

    monkeypatch.setattr(torch.Tensor, "__matmul__", recording)
    reference.token_logprobs(h, w, labels).sum().backward()
    assert largest and max(largest) <= 4 * 100 < 12 * 100


@pytest.mark.gpu
def test_bf16_on_the_gpu_is_as_close_as_plain_bf16_logits():
    h, w, labels = inputs(4096, 1024, 32000, seed=4)
    h, w = h.bfloat16(), w.bfloat16()
    truth = float64_truth(h, w, labels, None, 1.0)[0]
    plain = torch.log_softmax((h @ w.t()).float(), -1).gather(1, labels.unsqueeze(1)).squeeze(1)
    for op in OPS.values():
        assert rel_err(op(h, w, labels), truth) <= 2 * rel_err(plain, truth) + 1e-3
