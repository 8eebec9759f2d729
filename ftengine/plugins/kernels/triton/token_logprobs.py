"""Token log-probabilities through the LM head, a chunk of rows at a time, the row passes in Triton.

For each chunk of rows the logits ``z = h W^T`` come from cuBLAS in the inputs' dtype. With
``s = softcap(z) / T``:

* forward, one program per row, one pass over ``z``: an online max and sum of ``exp(s - m)``
  give ``lse``; ``logp = s[y] - lse``; the same pass accumulates ``sum exp(s - m) s`` (the
  entropy is ``lse - that / sum``), ``sum s`` (the mean logit) and the row maximum (whether the
  label is the argmax). Only ``lse`` (N floats) is kept for the backward.
* backward, one program per row, one pass: ``z`` recomputed by cuBLAS is overwritten in place by
  ``dz = g (onehot(y) - exp(s - lse)) / T (1 - tanh^2)``, then ``dh = dz W`` and ``dW += dz^T h``.

PyTorch would run several passes over each chunk's logits (max, exp-sum, gather, softmax, scatter,
scaling); here each direction reads them once. No ``(N, V)`` tensor exists at any time.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ftengine.plugins.kernels.lm_head_ops import token_logprobs_op
from ftengine.plugins.kernels.triton._utils import interpreting
from ftengine.plugins.kernels.triton._utils import next_power_of_2

CHUNK_ELEMENTS = 2**27
"""Logit elements of one chunk (256 MiB in bf16)."""


@triton.jit
def _transform(z, softcap, inv_t, HAS_SOFTCAP: tl.constexpr):
    if HAS_SOFTCAP:
        z = softcap * (2.0 * tl.sigmoid(2.0 * z / softcap) - 1.0)  # softcap * tanh(z / softcap)
    return z * inv_t


@triton.jit
def _fwd_row(z_ptr, stride, labels_ptr, lse_ptr, logp_ptr, stats_ptr, vocab, softcap, inv_t,
             HAS_SOFTCAP: tl.constexpr, STATS: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    base = z_ptr + row * stride
    m = tl.full((), float("-inf"), tl.float32)
    d = tl.zeros((), tl.float32)
    a = tl.zeros((), tl.float32)
    total = tl.zeros((), tl.float32)
    for start in range(0, vocab, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        mask = offs < vocab
        s = _transform(tl.load(base + offs, mask=mask, other=0.0).to(tl.float32), softcap, inv_t, HAS_SOFTCAP)
        s = tl.where(mask, s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, 0))
        scale = tl.exp(m - m_new)
        e = tl.where(mask, tl.exp(s - m_new), 0.0)
        d = d * scale + tl.sum(e, 0)
        if STATS:
            a = a * scale + tl.sum(e * tl.where(mask, s, 0.0), 0)
            total += tl.sum(tl.where(mask, s, 0.0), 0)
        m = m_new
    label = tl.load(labels_ptr + row)
    target = _transform(tl.load(base + label).to(tl.float32), softcap, inv_t, HAS_SOFTCAP)
    lse = m + tl.log(d)
    tl.store(lse_ptr + row, lse)
    tl.store(logp_ptr + row, target - lse)
    if STATS:
        tl.store(stats_ptr + row * 3, lse - a / d)
        tl.store(stats_ptr + row * 3 + 1, total / vocab)
        tl.store(stats_ptr + row * 3 + 2, (target >= m).to(tl.float32))


@triton.jit
def _bwd_row(z_ptr, stride, labels_ptr, lse_ptr, grad_ptr, vocab, softcap, inv_t,
             HAS_SOFTCAP: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    base = z_ptr + row * stride
    label = tl.load(labels_ptr + row)
    lse = tl.load(lse_ptr + row)
    g = tl.load(grad_ptr + row).to(tl.float32)
    for start in range(0, vocab, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        mask = offs < vocab
        z = tl.load(base + offs, mask=mask, other=0.0).to(tl.float32)
        s = _transform(z, softcap, inv_t, HAS_SOFTCAP)
        dz = g * (tl.where(offs == label, 1.0, 0.0) - tl.exp(s - lse)) * inv_t
        if HAS_SOFTCAP:
            t = s / (inv_t * softcap)
            dz = dz * (1.0 - t * t)
        tl.store(base + offs, dz.to(z_ptr.dtype.element_ty), mask=mask)


def _rows_per_chunk(vocab: int) -> int:
    return 8 if interpreting() else max(1, CHUNK_ELEMENTS // vocab)


def _block(vocab: int) -> int:
    return min(next_power_of_2(vocab), 128 if interpreting() else 4096)


def _launch_args(softcap: float | None, temperature: float) -> dict:
    return dict(softcap=float(softcap or 1.0), inv_t=1.0 / temperature, HAS_SOFTCAP=bool(softcap))


class _TritonTokenLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, labels, softcap, temperature, with_stats):
        n, vocab = hidden.shape[0], weight.shape[0]
        labels = labels.contiguous()
        lse = torch.empty(n, dtype=torch.float32, device=hidden.device)
        logp = torch.empty(n, dtype=torch.float32, device=hidden.device)
        stats = torch.empty(n, 3, dtype=torch.float32, device=hidden.device) if with_stats else logp
        rows = _rows_per_chunk(vocab)
        w = weight.to(hidden.dtype)
        for start in range(0, n, rows):
            stop = min(n, start + rows)
            z = hidden[start:stop] @ w.t()
            _fwd_row[(stop - start,)](z, z.stride(0), labels[start:stop], lse[start:stop], logp[start:stop],
                                      stats[start:stop], vocab, STATS=with_stats, BLOCK=_block(vocab),
                                      **_launch_args(softcap, temperature))
        ctx.save_for_backward(hidden, weight, labels, lse)
        ctx.softcap, ctx.temperature = softcap, temperature
        if with_stats:
            ctx.mark_non_differentiable(stats)
            return logp, stats
        return logp

    @staticmethod
    def backward(ctx, grad_logp, *_):
        hidden, weight, labels, lse = ctx.saved_tensors
        n, vocab = hidden.shape[0], weight.shape[0]
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_h = torch.empty_like(hidden) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        grad_logp = grad_logp.contiguous()
        w = weight.to(hidden.dtype)
        rows = _rows_per_chunk(vocab)
        for start in range(0, n, rows):
            stop = min(n, start + rows)
            h = hidden[start:stop]
            dz = h @ w.t()
            _bwd_row[(stop - start,)](dz, dz.stride(0), labels[start:stop], lse[start:stop], grad_logp[start:stop],
                                      vocab, BLOCK=_block(vocab), **_launch_args(ctx.softcap, ctx.temperature))
            if need_h:
                grad_h[start:stop] = dz @ w
            if need_w:
                grad_w += (dz.t() @ h).float()
        return grad_h, (grad_w.to(weight.dtype) if need_w else None), None, None, None, None


token_logprobs = token_logprobs_op(_TritonTokenLogprobs)
