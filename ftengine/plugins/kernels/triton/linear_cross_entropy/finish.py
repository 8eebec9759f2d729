"""A chunk's losses and gradients from ``q`` and each row's shift and sum (the one-pass and epilogue paths).

Both paths leave, per labelled row, a shift ``c``, the sum ``S = sum_{v != y} exp(s_v - c)``, the
label's logit ``s_y`` and ``q_v = exp(s_v - c) ds_v/dz_v`` (``q_y = 0``). With ``R = exp(s_y - c) + S
= exp(lse - c)``:

    loss = c + log R - s_y
    dL/dz = a q - b onehot(y),   a = 1 / (R n_valid),   b = (S / R) d_y / n_valid

(``1 - p_y = S / R`` has no cancellation), so ``dh = a (q W) - b W[y]`` and
``dW += q^T (a h) - scatter_y(b h)``: the softmax's normalisation is a per-row scale applied after
the matmul ``q W``, not a second pass over the logits.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ftengine.plugins.kernels.triton._utils import interpreting
from ftengine.plugins.kernels.triton.linear_cross_entropy.chunks import Work


@triton.jit
def _finish_rows_kernel(
    state_ptr, target_ptr, labels_ptr, rows_ptr, loss_ptr, coef_ptr, g_ptr, w_ptr, dh_ptr, inv_n_valid, n_vocab,
    n_rows, n_hidden, stride_g, stride_w, stride_dh, softcap,
    SOFTCAP: tl.constexpr, WRITE_DH: tl.constexpr, BLOCK_H: tl.constexpr,
):
    """A row's loss and coefficients ``a``, ``b`` from its shift and sum; with ``WRITE_DH``, its ``dh = a g - b W[y]``
    with ``g = q W``."""
    i = tl.program_id(0).to(tl.int64)
    label = tl.load(labels_ptr + i).to(tl.int64)
    valid = (label >= 0) & (label < n_vocab)
    shift = tl.load(state_ptr + 2 * i)
    rest = tl.load(state_ptr + 2 * i + 1)
    target = tl.load(target_ptr + i)
    ratio = tl.exp(target - shift) + rest  # exp(lse - c)
    d_y = 1.0
    if SOFTCAP:
        c = target / softcap
        d_y = 1.0 - c * c
    a = tl.where(valid, inv_n_valid / ratio, 0.0)
    b = tl.where(valid, inv_n_valid * (rest / ratio) * d_y, 0.0)
    tl.store(loss_ptr + i, tl.where(valid, shift + tl.log(ratio) - target, 0.0))
    tl.store(coef_ptr + 2 * i, a)
    tl.store(coef_ptr + 2 * i + 1, b)
    if WRITE_DH:
        safe_label = tl.where(valid, label, 0)
        row = tl.load(rows_ptr + i).to(tl.int64)
        cols = tl.arange(0, BLOCK_H)
        for start in range(0, n_hidden, BLOCK_H):
            mask = (start + cols < n_hidden) & (row < n_rows)  # a padding row of the first chunk stores nothing
            w = tl.load(w_ptr + safe_label * stride_w + start + cols, mask=mask, other=0.0).to(tl.float32)
            g = tl.load(g_ptr + i * stride_g + start + cols, mask=mask, other=0.0).to(tl.float32)
            tl.store(dh_ptr + row * stride_dh + start + cols, (a * g - b * w).to(dh_ptr.dtype.element_ty), mask=mask)


def buffers(work: Work) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(state, target, coef, g)``: per row shift and sum, label logit, ``(a, b)``; ``g = q W`` for one chunk."""
    device = work.hidden.device
    state = torch.empty((work.n_rows, 2), dtype=torch.float32, device=device)
    target = torch.zeros(work.n_rows, dtype=torch.float32, device=device)
    coef = torch.empty((work.n_rows, 2), dtype=torch.float32, device=device)
    g = work.w.new_empty((work.first, work.w.shape[1])) if work.need_dh else work.w.new_empty((1, 1))
    return state, target, coef, g


def finish_chunk(work: Work, chunk: tuple, q: torch.Tensor, g: torch.Tensor, state: torch.Tensor,
                 target: torch.Tensor, coef: torch.Tensor) -> None:
    """A chunk's losses, its rows of ``dh`` from ``g = q W`` and, with ``dW``, its share of that."""
    part, rows, labels, h = chunk
    n = rows.numel()
    n_vocab, n_hidden = work.w.shape
    if work.need_dh:
        torch.mm(q, work.w, out=g[:n])
    _finish_rows_kernel[(n,)](
        state[part], target[part], labels, rows, work.losses[part], coef[part], g, work.w, work.dh,
        work.inv_n_valid, n_vocab, work.n_rows, n_hidden, g.stride(0), work.w.stride(0),
        work.dh.stride(0) if work.dh.numel() else 0, work.softcap_arg,
        SOFTCAP=bool(work.softcap), WRITE_DH=work.dh.numel() > 0, BLOCK_H=256 if interpreting() else 1024,
    )
    if work.dw.numel():
        a, b = coef[part].unbind(1)
        work.dw.addmm_(q.t().to(work.dw.dtype), (h * a[:, None]).to(work.dw.dtype))
        work.dw.index_add_(0, labels.clamp(0, n_vocab - 1), (h * -b[:, None]).to(work.dw.dtype))
