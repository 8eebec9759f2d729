"""LM head fused with cross-entropy, in token chunks: the ``(N, V)`` logits never exist at once.

Only the tokens with a label take part: the ignored ones (prompts, padding) have no loss and no
gradient, so their rows are left out of every matmul (one host sync, to count them). Per chunk
of ``n`` such tokens: ``z = h W^T`` (cuBLAS, in the hidden dtype with fp32 accumulation), then
one Triton program per row computes, in fp32, with an optional softcap ``s = c tanh(z / c)``:

    lse  = log sum_v exp(s_v)                 (online max / sum over blocks of the vocabulary)
    loss = lse - s_y
    dL/ds_v = (exp(s_v - lse) - [v == y]) / n_valid
    ds/dz   = 1 - tanh(z / c)**2 = 1 - (s / c)**2

and writes ``dL/dz`` over the chunk's logits in place. Then ``dh = dz W`` (scattered into the
chunk's rows of the hidden gradient) and, when the weight is trained, ``dW += dz^T h``. All of
this happens in the forward: the loss is a scalar, so the backward only scales the stored
gradients by the incoming one. Peak extra memory: one chunk of logits plus the gradients.

Running the cross-entropy pass of one chunk on a side stream, under the next chunk's matmuls,
was measured on an H100 (8192 tokens, 3584 -> 152064): no faster at equal memory (two 192 MiB
buffers 28.9 ms, one 384 MiB buffer 28.9 ms), so the chunks run in order on one stream.
"""

from __future__ import annotations

import itertools

import torch
import triton
import triton.language as tl

from ftengine.plugins.kernels.triton import _exp_logits_matmul as exp_logits_matmul
from ftengine.plugins.kernels.triton._exp_logits_matmul import TRUSTED_LOG_RATIO
from ftengine.plugins.kernels.triton._exp_logits_matmul import softcapped
from ftengine.plugins.kernels.triton._op_registry import register_op
from ftengine.plugins.kernels.triton._utils import interpreting
from ftengine.plugins.kernels.triton._utils import next_power_of_2

# Logit bytes per chunk. H100, 8192 tokens (500 ignored) 3584 -> 152064: 128 MiB 31.3 ms, 192 MiB 29.0 ms,
# 256 MiB 28.7 ms, 384 MiB 28.9 ms (1282 tokens a chunk, 0.435 GiB peak; 27.3 ms in the benchmark table's run).
CHUNK_BYTES = 384 * 1024 * 1024


@triton.jit
def _ce_chunk_kernel(
    logits_ptr, labels_ptr, loss_ptr, inv_n_valid, n_vocab, stride_row, softcap,
    BLOCK_V: tl.constexpr, SOFTCAP: tl.constexpr, WRITE_GRAD: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    row_ptr = logits_ptr + row * stride_row
    label = tl.load(labels_ptr + row).to(tl.int64)
    valid = (label >= 0) & (label < n_vocab)
    cols = tl.arange(0, BLOCK_V)

    m = -float("inf")
    acc = 0.0
    for start in range(0, n_vocab, BLOCK_V):
        idx = start + cols
        vmask = idx < n_vocab
        z = tl.load(row_ptr + idx, mask=vmask, other=0.0).to(tl.float32)
        s = tl.where(vmask, softcapped(z, softcap, SOFTCAP), -float("inf"))
        m_new = tl.maximum(m, tl.max(s, axis=0))
        acc = acc * tl.exp(m - m_new) + tl.sum(tl.exp(s - m_new), axis=0)
        m = m_new
    lse = m + tl.log(acc)

    safe_label = tl.where(valid, label, 0)
    target = softcapped(tl.load(row_ptr + safe_label).to(tl.float32), softcap, SOFTCAP)
    tl.store(loss_ptr + row, tl.where(valid, lse - target, 0.0))

    if WRITE_GRAD:
        scale = tl.where(valid, inv_n_valid, 0.0)
        for start in range(0, n_vocab, BLOCK_V):
            idx = start + cols
            vmask = idx < n_vocab
            z = tl.load(row_ptr + idx, mask=vmask, other=0.0).to(tl.float32)
            s = softcapped(z, softcap, SOFTCAP)
            g = tl.exp(s - lse) - tl.where(idx == safe_label, 1.0, 0.0)
            g = g * scale
            if SOFTCAP:
                r = s / softcap
                g = g * (1.0 - r * r)
            tl.store(row_ptr + idx, g.to(logits_ptr.dtype.element_ty), mask=vmask)


@triton.jit
def _finish_rows_kernel(
    sums_ptr, target_ptr, ref_ptr, labels_ptr, rows_ptr, g_ptr, w_ptr, dh_ptr,
    loss_ptr, coef_ptr, redo_ptr, inv_n_valid, n_vocab, n_tiles, n_hidden, stride_g, stride_w, stride_dh, softcap,
    BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr, SOFTCAP: tl.constexpr, WRITE_DH: tl.constexpr,
):
    """Per row of a chunk from :func:`exp_logits`: the loss, the two gradient coefficients, ``dL/dh``.

    ``R = exp(s_y - r) + sum(e)`` and ``p_y = exp(s_y - r) / R``: loss ``log R - (s_y - r)``,
    ``a = 1 / (R n_valid)`` (the scale of ``q``) and ``b = (1 - p_y) d_y / n_valid``, with
    ``1 - p_y = sum(e) / R`` free of cancellation. ``dL/dh = a (q W) - b W[y]``.
    """
    i = tl.program_id(0).to(tl.int64)
    label = tl.load(labels_ptr + i).to(tl.int64)
    valid = (label >= 0) & (label < n_vocab)
    safe_label = tl.where(valid, label, 0)
    ref = tl.load(ref_ptr + i)
    target = tl.where(valid, tl.load(target_ptr + i), ref)
    tiles = tl.arange(0, BLOCK_T)
    rest = tl.zeros((BLOCK_T,), tl.float32)
    for start in range(0, n_tiles, BLOCK_T):
        rest += tl.load(sums_ptr + i * n_tiles + start + tiles, mask=start + tiles < n_tiles, other=0.0)
    rest_sum = tl.sum(rest, axis=0)
    ratio = tl.exp(target - ref) + rest_sum
    log_ratio = tl.log(ratio)
    trusted = log_ratio <= TRUSTED_LOG_RATIO  # false for inf / nan too
    ok = valid & trusted
    d_y = 1.0
    if SOFTCAP:
        c = target / softcap
        d_y = 1.0 - c * c
    a = tl.where(ok, inv_n_valid / ratio, 0.0)
    b = tl.where(ok, inv_n_valid * (rest_sum / ratio) * d_y, 0.0)
    tl.store(loss_ptr + i, tl.where(ok, log_ratio - (target - ref), 0.0))
    tl.store(coef_ptr + 2 * i, a)
    tl.store(coef_ptr + 2 * i + 1, b)
    tl.store(redo_ptr + i, (valid & ~trusted).to(tl.int8))
    if WRITE_DH:
        row = tl.load(rows_ptr + i).to(tl.int64)
        cols = tl.arange(0, BLOCK_H)
        for start in range(0, n_hidden, BLOCK_H):
            mask = start + cols < n_hidden
            g = tl.load(g_ptr + i * stride_g + start + cols, mask=mask, other=0.0).to(tl.float32)
            w = tl.load(w_ptr + safe_label * stride_w + start + cols, mask=mask, other=0.0).to(tl.float32)
            tl.store(dh_ptr + row * stride_dh + start + cols, (a * g - b * w).to(dh_ptr.dtype.element_ty), mask=mask)


def _chunk_bounds(n_rows: int, row_bytes: int, block_rows: int = 1) -> list[int]:
    """Chunk boundaries: at most ``CHUNK_BYTES`` of logits each, on multiples of ``block_rows``, near-equal sizes."""
    blocks = -(-n_rows // block_rows)
    per_chunk = max(1, CHUNK_BYTES // max(1, row_bytes * block_rows))
    n_chunks = -(-blocks // per_chunk)
    return [min(n_rows, (i * blocks // n_chunks) * block_rows) for i in range(n_chunks + 1)]


def _dw_dtype(weight: torch.Tensor, hidden: torch.Tensor) -> torch.dtype:
    """``dL/dW`` accumulates in fp32 for an fp32 weight, else in the hidden dtype."""
    return torch.float32 if weight.dtype == torch.float32 else hidden.dtype


class _Work:
    """What both passes share: the inputs, the valid rows, and the outputs they fill."""

    def __init__(self, hidden, w, labels, rows, softcap, dh, dw, losses):
        self.hidden, self.w, self.labels, self.rows, self.softcap = hidden, w, labels, rows, softcap
        self.dh, self.dw, self.losses = dh, dw, losses
        self.compact = rows.numel() < hidden.shape[0]
        self.inv_n_valid = 1.0 / rows.numel()

    def hidden_rows(self, rows: torch.Tensor, start: int, stop: int) -> torch.Tensor:
        return self.hidden.index_select(0, rows) if self.compact else self.hidden[start:stop]


def _exact_pass(work: _Work, positions: torch.Tensor | None) -> None:
    """Logits by cuBLAS, then a softmax pass over them per chunk; ``positions`` picks valid rows (all if None)."""
    rows = work.rows if positions is None else work.rows.index_select(0, positions)
    labels = work.labels if positions is None else work.labels.index_select(0, positions)
    losses = work.losses if positions is None else torch.empty(rows.numel(), device=rows.device)
    n_vocab = work.w.shape[0]
    contiguous = positions is None and not work.compact
    block_v = min(next_power_of_2(n_vocab), 1024 if interpreting() else 4096)
    bounds = _chunk_bounds(rows.numel(), n_vocab * work.hidden.element_size())
    for start, stop in itertools.pairwise(bounds):
        h = work.hidden[start:stop] if contiguous else work.hidden.index_select(0, rows[start:stop])
        logits = h @ work.w.t()  # (n, V) in the hidden dtype, fp32 accumulation
        _ce_chunk_kernel[(stop - start,)](
            logits, labels[start:stop], losses[start:stop], work.inv_n_valid, n_vocab, logits.stride(0),
            float(work.softcap) if work.softcap else 1.0, BLOCK_V=block_v, SOFTCAP=bool(work.softcap),
            WRITE_GRAD=work.dh.numel() > 0 or work.dw.numel() > 0, num_warps=8,
        )
        if work.dh.numel():
            if contiguous:
                torch.mm(logits, work.w, out=work.dh[start:stop])  # (n, H)
            else:
                work.dh.index_copy_(0, rows[start:stop], logits @ work.w)
        if work.dw.numel():
            work.dw.addmm_(logits.t().to(work.dw.dtype), h.to(work.dw.dtype))  # (V, H)
        del logits
    if positions is not None:
        work.losses.index_copy_(0, positions, losses)


def _fast_pass(work: _Work) -> torch.Tensor:
    """The logits matmul writes the softmax's exponentials (:mod:`._exp_logits_matmul`); returns rows to redo."""
    n_valid, n_vocab, n_hidden = work.rows.numel(), work.w.shape[0], work.w.shape[1]
    softcap = float(work.softcap) if work.softcap else 1.0
    ref = exp_logits_matmul.label_logits(work.hidden, work.w, work.rows, work.labels, work.softcap)
    coef = torch.empty((n_valid, 2), dtype=torch.float32, device=work.hidden.device)
    redo = torch.empty(n_valid, dtype=torch.int8, device=work.hidden.device)
    block_rows = exp_logits_matmul.config()["BLOCK_M"]
    bounds = _chunk_bounds(n_valid, n_vocab * work.hidden.element_size(), block_rows)
    for start, stop in itertools.pairwise(bounds):
        rows = work.rows[start:stop]
        h = work.hidden_rows(rows, start, stop)
        q, sums, target = exp_logits_matmul.exp_logits(h, work.w, ref[start:stop], work.labels[start:stop],
                                                      work.softcap)
        g = q @ work.w if work.dh.numel() else q  # (n, H): the unscaled dL/dh; a placeholder when not needed
        _finish_rows_kernel[(stop - start,)](
            sums, target, ref[start:stop], work.labels[start:stop], rows, g, work.w, work.dh,
            work.losses[start:stop], coef[start:stop], redo[start:stop], work.inv_n_valid, n_vocab, sums.shape[1],
            n_hidden, g.stride(0), work.w.stride(0), work.dh.stride(0) if work.dh.numel() else 0, softcap,
            BLOCK_T=min(next_power_of_2(sums.shape[1]), 1024), BLOCK_H=256 if interpreting() else 1024,
            SOFTCAP=bool(work.softcap), WRITE_DH=work.dh.numel() > 0,
        )
        if work.dw.numel():
            a, b = coef[start:stop, 0:1], coef[start:stop, 1:2]
            work.dw.addmm_(q.t().to(work.dw.dtype), (h * a).to(work.dw.dtype))
            labels = work.labels[start:stop].clamp(0, n_vocab - 1)
            work.dw.index_add_(0, labels, (h * -b).to(work.dw.dtype))
        del q, g
    return redo.nonzero().squeeze(1)


def fused_forward(
    hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, ignore_index: int, softcap: float | None,
    need_dh: bool, need_dw: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Loss (fp32 scalar) and, as asked, ``dL/dhidden`` and ``dL/dW`` for a unit upstream gradient.

    ``hidden`` is ``(N, H)`` and ``labels`` ``(N,)``, both contiguous; a gradient not asked for
    comes back as an empty tensor. No autograd.
    """
    w = weight.to(hidden.dtype).contiguous()
    rows = (labels != ignore_index).nonzero().squeeze(1)
    n_valid = rows.numel()
    compact = n_valid < hidden.shape[0]
    dh, dw = hidden.new_empty(0), weight.new_empty(0)
    if need_dh:
        dh = torch.zeros_like(hidden) if compact else torch.empty_like(hidden)
    if need_dw:
        dw = torch.zeros(weight.shape, dtype=_dw_dtype(weight, hidden), device=weight.device)
    if n_valid == 0:
        return hidden.new_zeros((), dtype=torch.float32), dh, dw
    losses = torch.empty(n_valid, dtype=torch.float32, device=hidden.device)
    work = _Work(hidden, w, labels.index_select(0, rows) if compact else labels, rows, softcap, dh, dw, losses)
    if exp_logits_matmul.supported(hidden, w):
        redo = _fast_pass(work)
        if redo.numel():
            _exact_pass(work, redo)
    else:
        _exact_pass(work, None)
    return losses.sum() / n_valid, dh, dw


def _fused_forward_fake(hidden, weight, labels, ignore_index, softcap, need_dh, need_dw):
    loss = hidden.new_empty((), dtype=torch.float32)
    dh = torch.empty_like(hidden) if need_dh else hidden.new_empty(0)
    dw = weight.new_empty(weight.shape, dtype=_dw_dtype(weight, hidden)) if need_dw else weight.new_empty(0)
    return loss, dh, dw


# the loss and both gradients in one opaque op: the compiler sees neither the launches nor the host sync
_fused_forward_op = register_op("linear_cross_entropy_forward", fused_forward, fake=_fused_forward_fake)


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, labels, ignore_index, softcap):
        need_dh, need_dw = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        loss, dh, dw = _fused_forward_op(hidden, weight, labels, ignore_index, softcap, need_dh, need_dw)
        ctx.save_for_backward(*(t for t, need in ((dh, need_dh), (dw, need_dw)) if need))
        ctx.has = (need_dh, need_dw)
        ctx.weight_dtype = weight.dtype
        return loss

    @staticmethod
    def backward(ctx, grad_out):
        saved = list(ctx.saved_tensors)
        dh = saved.pop(0) * grad_out if ctx.has[0] else None
        dw = (saved.pop(0) * grad_out).to(ctx.weight_dtype) if ctx.has[1] else None
        return dh, dw, None, None, None


def linear_cross_entropy(
    hidden: torch.Tensor,
    lm_head_weight: torch.Tensor,
    labels: torch.Tensor,
    ignore_index: int = -100,
    softcap: float | None = None,
) -> torch.Tensor:
    """Mean cross-entropy of ``hidden @ lm_head_weight.T`` against ``labels``, chunked over tokens.

    Args:
        hidden: ``(..., H)`` final hidden states.
        lm_head_weight: ``(V, H)``.
        labels: ``(...)`` target ids, already shifted; ``ignore_index`` marks tokens without a loss.
        ignore_index: label value to skip.
        softcap: if set, logits become ``softcap * tanh(logits / softcap)`` first (Gemma-2).

    Returns:
        The fp32 scalar loss, averaged over the non-ignored tokens.
    """
    hidden = hidden.reshape(-1, hidden.shape[-1])
    labels = labels.reshape(-1)
    if labels.shape[0] != hidden.shape[0]:
        raise ValueError(f"linear_cross_entropy: {hidden.shape[0]} hidden rows but {labels.shape[0]} labels")
    return _LinearCrossEntropy.apply(hidden.contiguous(), lm_head_weight, labels.contiguous(), int(ignore_index),
                                     None if softcap is None else float(softcap))
