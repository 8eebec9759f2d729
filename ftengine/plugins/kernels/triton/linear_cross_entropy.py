"""LM head fused with cross-entropy, in token chunks: the ``(N, V)`` logits never exist at once.

Only the tokens with a label take part: the ignored ones (prompts, padding) have no loss and no
gradient, so their rows are left out of every matmul (one host sync, to count them). Per chunk
of ``n`` such tokens, ``z = h W^T`` (cuBLAS, in the hidden dtype with fp32 accumulation), then
one Triton program per row makes a single pass over its logits, in fp32, with an optional
softcap ``s = c tanh(z / c)`` and a shift ``m`` (the label's own logit ``s_y``, see below):

    e_v = exp(s_v - m)  (v != y),   S = sum_v e_v,   R = exp(s_y - m) + S = exp(lse - m)
    loss = m + log R - s_y
    q_v  = e_v d_v  written over z_v (q_y = 0),   d_v = ds/dz = 1 - (s_v / c)**2  (1 without softcap)

so that ``dL/dz = (q / R - (S / R) d_y onehot(y)) / n_valid``: the softmax's normalisation is a
per-row scale, applied after ``q W`` instead of in a second pass over the logits. Hence
``dh = a (q W) - b W[y]`` with ``a = 1 / (R n_valid)``, ``b = (S / R) d_y / n_valid`` (``1 - p_y =
S / R`` has no cancellation), and ``dW += q^T (a h) - scatter(b h)``. The logits are read once and
written once, against three passes for a max / sum pass followed by a gradient pass.

Why ``s_y`` as the shift: the row's maximum is not known before the pass, but ``s_v - s_y`` stays
below the token's loss, so ``e`` neither overflows nor loses the values that carry the softmax's
mass to underflow. Should a block of the row go more than ``SHIFT_LIMIT`` above the shift (a loss
of more than 60 nats), the shift moves to that block's maximum and the blocks already written are
scaled down to match (a second read of that row's start, for such rows only). fp16's range is too
narrow for ``e``: it takes the two-pass kernel (max / sum, then the gradient).

All of this happens in the forward: the loss is a scalar, so the backward only scales the stored
gradients by the incoming one. Peak extra memory: one chunk of logits plus the gradients.

Running the cross-entropy pass of one chunk on a side stream, under the next chunk's matmuls,
was measured on an H100 (8192 tokens, 3584 -> 152064): no faster at equal memory (two 192 MiB
buffers 28.9 ms, one 384 MiB buffer 28.9 ms), so the chunks run in order on one stream. Writing
``q`` from the epilogue of a Triton matmul instead of a pass after cuBLAS' was 7% slower in the
matmul than the pass saves.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator

import torch
import triton
import triton.language as tl

from ftengine.plugins.kernels.triton._op_registry import register_op
from ftengine.plugins.kernels.triton._utils import interpreting
from ftengine.plugins.kernels.triton._utils import next_power_of_2

# Logit bytes per chunk. H100, 8192 tokens (500 ignored) 3584 -> 152064, one-pass op, alternating rounds:
# 280 MiB (8 chunks) 27.4 ms, 320 MiB (7) 28.0 ms, 384 MiB (6 chunks of 1,282 tokens) 26.9 ms at a 0.444 GiB
# peak; a fifth fewer chunks would pass 0.5 GiB.
CHUNK_BYTES = 384 * 1024 * 1024

# the largest exp(s - shift) written: e^60 in bf16 / fp32, and 152064 of them still sum far below fp32's range
SHIFT_LIMIT = tl.constexpr(60.0)


@triton.jit
def softcapped(z, softcap, SOFTCAP: tl.constexpr):
    if SOFTCAP:
        # c tanh(z / c), tanh(x) = 1 - 2 / (exp(2x) + 1) with the argument clamped (fp32 saturates at |x| > 20)
        x = tl.minimum(tl.maximum(z / softcap, -20.0), 20.0)
        z = softcap * (1.0 - 2.0 / (tl.exp(2.0 * x) + 1.0))
    return z


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
def _exp_rows_kernel(
    logits_ptr, labels_ptr, loss_ptr, coef_ptr, inv_n_valid, n_vocab, stride_row, softcap,
    BLOCK_V: tl.constexpr, SOFTCAP: tl.constexpr,
):
    """One pass over a row's logits: ``q`` written over them, and the row's loss, ``a`` and ``b``."""
    row = tl.program_id(0).to(tl.int64)
    row_ptr = logits_ptr + row * stride_row
    label = tl.load(labels_ptr + row).to(tl.int64)
    valid = (label >= 0) & (label < n_vocab)
    safe_label = tl.where(valid, label, 0)
    target = softcapped(tl.load(row_ptr + safe_label).to(tl.float32), softcap, SOFTCAP)
    shift = target
    cols = tl.arange(0, BLOCK_V)
    acc = tl.zeros((BLOCK_V,), tl.float32)
    for start in range(0, n_vocab, BLOCK_V):
        idx = start + cols
        vmask = idx < n_vocab
        s = softcapped(tl.load(row_ptr + idx, mask=vmask, other=0.0).to(tl.float32), softcap, SOFTCAP)
        block_max = tl.max(tl.where(vmask, s, -float("inf")), axis=0)
        if block_max > shift + SHIFT_LIMIT:  # a loss above SHIFT_LIMIT nats: move the shift, rescale what is written
            scale = tl.exp(shift - block_max)
            acc = acc * scale
            tl.debug_barrier()
            for done in range(0, start, BLOCK_V):
                prev = row_ptr + done + cols
                tl.store(prev, (tl.load(prev).to(tl.float32) * scale).to(logits_ptr.dtype.element_ty))
            shift = block_max
        e = tl.where(vmask & (idx != safe_label), tl.exp(s - shift), 0.0)
        acc += e
        q = e
        if SOFTCAP:
            r = s / softcap
            q = e * (1.0 - r * r)
        tl.store(row_ptr + idx, q.to(logits_ptr.dtype.element_ty), mask=vmask)
    rest = tl.sum(acc, axis=0)
    ratio = tl.exp(target - shift) + rest  # exp(lse - shift)
    d_y = 1.0
    if SOFTCAP:
        c = target / softcap
        d_y = 1.0 - c * c
    tl.store(loss_ptr + row, tl.where(valid, shift + tl.log(ratio) - target, 0.0))
    tl.store(coef_ptr + 2 * row, tl.where(valid, inv_n_valid / ratio, 0.0))
    tl.store(coef_ptr + 2 * row + 1, tl.where(valid, inv_n_valid * (rest / ratio) * d_y, 0.0))


@triton.jit
def _hidden_grad_rows_kernel(
    g_ptr, w_ptr, labels_ptr, rows_ptr, coef_ptr, dh_ptr, n_vocab, n_hidden, stride_g, stride_w, stride_dh,
    BLOCK_H: tl.constexpr,
):
    """``dh[rows[i]] = a_i g_i - b_i W[y_i]``, with ``g = q W`` from the chunk's matmul."""
    i = tl.program_id(0).to(tl.int64)
    label = tl.load(labels_ptr + i).to(tl.int64)
    safe_label = tl.where((label >= 0) & (label < n_vocab), label, 0)
    row = tl.load(rows_ptr + i).to(tl.int64)
    a = tl.load(coef_ptr + 2 * i)
    b = tl.load(coef_ptr + 2 * i + 1)
    cols = tl.arange(0, BLOCK_H)
    for start in range(0, n_hidden, BLOCK_H):
        mask = start + cols < n_hidden
        g = tl.load(g_ptr + i * stride_g + start + cols, mask=mask, other=0.0).to(tl.float32)
        w = tl.load(w_ptr + safe_label * stride_w + start + cols, mask=mask, other=0.0).to(tl.float32)
        tl.store(dh_ptr + row * stride_dh + start + cols, (a * g - b * w).to(dh_ptr.dtype.element_ty), mask=mask)


def _chunk_bounds(n_rows: int, row_bytes: int) -> list[int]:
    """Chunk boundaries: at most ``CHUNK_BYTES`` of logits each, the chunks near-equal (no small last matmul)."""
    per_chunk = max(1, CHUNK_BYTES // max(1, row_bytes))
    n_chunks = -(-n_rows // per_chunk)
    return [i * n_rows // n_chunks for i in range(n_chunks + 1)]


def single_pass_suits(dtype: torch.dtype) -> bool:
    """fp16's exponent range is too narrow for ``exp(s - s_y)``: it takes the exact two-pass kernel."""
    return dtype != torch.float16


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
        self.softcap_arg = float(softcap) if softcap else 1.0  # the kernels' argument (unused without softcap)
        self.block_v = min(next_power_of_2(w.shape[0]), 1024 if interpreting() else 4096)

    def chunks(self) -> Iterator[tuple[slice, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]]:
        """Per chunk of valid rows: its slice of them, their row indices, labels, hidden states and logits.

        The logits ``h W^T`` (cuBLAS, in the hidden dtype with fp32 accumulation) are not kept here:
        the caller's last reference frees them.
        """
        bounds = _chunk_bounds(self.rows.numel(), self.w.shape[0] * self.w.element_size())
        for start, stop in itertools.pairwise(bounds):
            rows = self.rows[start:stop]
            h = self.hidden.index_select(0, rows) if self.compact else self.hidden[start:stop]
            yield slice(start, stop), rows, self.labels[start:stop], h, h @ self.w.t()


def _exact_pass(work: _Work) -> None:
    """Per chunk, a max / sum pass and a gradient pass over the logits."""
    for part, rows, labels, h, logits in work.chunks():
        _ce_chunk_kernel[(rows.numel(),)](
            logits, labels, work.losses[part], work.inv_n_valid, work.w.shape[0], logits.stride(0), work.softcap_arg,
            BLOCK_V=work.block_v, SOFTCAP=bool(work.softcap), WRITE_GRAD=work.dh.numel() > 0 or work.dw.numel() > 0,
            num_warps=8,
        )
        if work.dh.numel():
            if work.compact:
                work.dh.index_copy_(0, rows, logits @ work.w)
            else:
                torch.mm(logits, work.w, out=work.dh[part])  # (n, H)
        if work.dw.numel():
            work.dw.addmm_(logits.t().to(work.dw.dtype), h.to(work.dw.dtype))  # (V, H)
        del logits


def _single_pass(work: _Work) -> None:
    """Per chunk, one pass over the logits (module docstring), then ``dh`` from ``q W``."""
    n_vocab, n_hidden = work.w.shape
    coef = torch.empty((work.rows.numel(), 2), dtype=torch.float32, device=work.hidden.device)
    for part, rows, labels, h, q in work.chunks():  # q: the logits, overwritten in place
        _exp_rows_kernel[(rows.numel(),)](
            q, labels, work.losses[part], coef[part], work.inv_n_valid, n_vocab, q.stride(0), work.softcap_arg,
            BLOCK_V=work.block_v, SOFTCAP=bool(work.softcap), num_warps=8,
        )
        if work.dh.numel():
            g = q @ work.w  # (n, H)
            _hidden_grad_rows_kernel[(rows.numel(),)](
                g, work.w, labels, rows, coef[part], work.dh, n_vocab, n_hidden, g.stride(0), work.w.stride(0),
                work.dh.stride(0), BLOCK_H=256 if interpreting() else 1024,
            )
        if work.dw.numel():
            a, b = coef[part, 0:1], coef[part, 1:2]
            work.dw.addmm_(q.t().to(work.dw.dtype), (h * a).to(work.dw.dtype))
            work.dw.index_add_(0, labels.clamp(0, n_vocab - 1), (h * -b).to(work.dw.dtype))
        del q


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
    if single_pass_suits(hidden.dtype):
        _single_pass(work)
    else:
        _exact_pass(work)
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
