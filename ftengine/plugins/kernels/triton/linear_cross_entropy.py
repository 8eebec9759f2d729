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

import torch
import triton
import triton.language as tl

from ftengine.plugins.kernels.triton._op_registry import register_op
from ftengine.plugins.kernels.triton._utils import interpreting
from ftengine.plugins.kernels.triton._utils import next_power_of_2

# Logit bytes per chunk. H100, 8192 tokens (500 ignored) 3584 -> 152064: 128 MiB 31.3 ms, 192 MiB 29.0 ms,
# 256 MiB 28.7 ms, 384 MiB 28.9 ms (1282 tokens a chunk, 0.435 GiB peak; 27.3 ms in the benchmark table's run).
CHUNK_BYTES = 384 * 1024 * 1024


@triton.jit
def _softcapped(z, softcap, SOFTCAP: tl.constexpr):
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
        s = tl.where(vmask, _softcapped(z, softcap, SOFTCAP), -float("inf"))
        m_new = tl.maximum(m, tl.max(s, axis=0))
        acc = acc * tl.exp(m - m_new) + tl.sum(tl.exp(s - m_new), axis=0)
        m = m_new
    lse = m + tl.log(acc)

    safe_label = tl.where(valid, label, 0)
    target = _softcapped(tl.load(row_ptr + safe_label).to(tl.float32), softcap, SOFTCAP)
    tl.store(loss_ptr + row, tl.where(valid, lse - target, 0.0))

    if WRITE_GRAD:
        scale = tl.where(valid, inv_n_valid, 0.0)
        for start in range(0, n_vocab, BLOCK_V):
            idx = start + cols
            vmask = idx < n_vocab
            z = tl.load(row_ptr + idx, mask=vmask, other=0.0).to(tl.float32)
            s = _softcapped(z, softcap, SOFTCAP)
            g = tl.exp(s - lse) - tl.where(idx == safe_label, 1.0, 0.0)
            g = g * scale
            if SOFTCAP:
                r = s / softcap
                g = g * (1.0 - r * r)
            tl.store(row_ptr + idx, g.to(logits_ptr.dtype.element_ty), mask=vmask)


def _chunk_tokens(n_tokens: int, n_vocab: int, elem_bytes: int) -> int:
    """Tokens per chunk: within ``CHUNK_BYTES`` of logits, the chunks equal in size (no small last matmul)."""
    rows = max(1, CHUNK_BYTES // max(1, n_vocab * elem_bytes))
    n_chunks = max(1, -(-n_tokens // rows))
    return max(1, -(-n_tokens // n_chunks))


def _dw_dtype(weight: torch.Tensor, hidden: torch.Tensor) -> torch.dtype:
    """``dL/dW`` accumulates in fp32 for an fp32 weight, else in the hidden dtype."""
    return torch.float32 if weight.dtype == torch.float32 else hidden.dtype


def fused_forward(
    hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, ignore_index: int, softcap: float | None,
    need_dh: bool, need_dw: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Loss (fp32 scalar) and, as asked, ``dL/dhidden`` and ``dL/dW`` for a unit upstream gradient.

    ``hidden`` is ``(N, H)`` and ``labels`` ``(N,)``, both contiguous; a gradient not asked for
    comes back as an empty tensor. No autograd.
    """
    n_tokens, n_vocab = hidden.shape[0], weight.shape[0]
    dtype = hidden.dtype
    w = weight.to(dtype)
    rows = (labels != ignore_index).nonzero().squeeze(1)
    n_valid = rows.numel()
    compact = n_valid < n_tokens
    dh, dw = hidden.new_empty(0), weight.new_empty(0)
    if need_dh:
        dh = torch.zeros_like(hidden) if compact else torch.empty_like(hidden)
    if need_dw:
        dw = torch.zeros(weight.shape, dtype=_dw_dtype(weight, hidden), device=weight.device)
    if n_valid == 0:
        return hidden.new_zeros((), dtype=torch.float32), dh, dw
    valid_labels = labels.index_select(0, rows) if compact else labels
    losses = torch.empty(n_valid, dtype=torch.float32, device=hidden.device)
    write_grad = need_dh or need_dw
    block_v = min(next_power_of_2(n_vocab), 1024 if interpreting() else 4096)
    chunk = _chunk_tokens(n_valid, n_vocab, hidden.element_size())
    for start in range(0, n_valid, chunk):
        stop = min(start + chunk, n_valid)
        h = hidden.index_select(0, rows[start:stop]) if compact else hidden[start:stop]
        logits = h @ w.t()  # (n, V) in the hidden dtype, fp32 accumulation
        _ce_chunk_kernel[(stop - start,)](
            logits, valid_labels[start:stop], losses[start:stop], 1.0 / n_valid, n_vocab, logits.stride(0),
            float(softcap) if softcap else 1.0, BLOCK_V=block_v, SOFTCAP=bool(softcap), WRITE_GRAD=write_grad,
            num_warps=8,
        )
        if need_dh:
            if compact:
                dh.index_copy_(0, rows[start:stop], logits @ w)
            else:
                torch.mm(logits, w, out=dh[start:stop])  # (n, H)
        if need_dw:
            dw.addmm_(logits.t().to(dw.dtype), h.to(dw.dtype))  # (V, H)
        del logits
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
