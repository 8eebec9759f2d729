"""The exact path (fp16): per chunk, a max / sum pass over the logits, then a gradient pass.

fp16's exponent range is too narrow to hold ``exp(s - shift)`` for a shift fixed before the row's
maximum is known, so this path computes the log-sum-exp first and writes the gradient in a second
pass over the same logits: ``dL/dz_v = (softmax(s)_v - onehot(y)_v) ds_v/dz_v / n_valid``, then
``dh = (dL/dz) W`` and ``dW += (dL/dz)^T h``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ftengine.plugins.kernels.triton._utils import interpreting
from ftengine.plugins.kernels.triton._utils import next_power_of_2
from ftengine.plugins.kernels.triton.linear_cross_entropy.chunks import Work
from ftengine.plugins.kernels.triton.linear_cross_entropy.exp_logits_matmul import softcapped


def block_columns(n_cols: int) -> int:
    """Vocabulary columns a row's program loads at a time."""
    return min(next_power_of_2(n_cols), 1024 if interpreting() else 4096)


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




def run(work: Work) -> None:
    """Per chunk, the logits, a max / sum pass and a gradient pass over them; ``dh`` and ``dW`` from the gradient."""
    for part, rows, labels, h in work.chunks():
        logits = h @ work.w.t()
        _ce_chunk_kernel[(rows.numel(),)](
            logits, labels, work.losses[part], work.inv_n_valid, work.w.shape[0], logits.stride(0), work.softcap_arg,
            BLOCK_V=block_columns(work.w.shape[0]), SOFTCAP=bool(work.softcap),
            WRITE_GRAD=work.dh.numel() > 0 or work.dw.numel() > 0, num_warps=8,
        )
        if work.dh.numel():
            if work.compact:
                work.dh.index_copy_(0, rows, logits @ work.w)
            else:
                torch.mm(logits, work.w, out=work.dh[part])  # (n, H)
        if work.dw.numel():
            work.dw.addmm_(logits.t().to(work.dw.dtype), h.to(work.dw.dtype))  # (V, H)
        del logits
