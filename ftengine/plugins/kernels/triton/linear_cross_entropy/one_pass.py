"""The one-pass path (fp32, and bf16 where the epilogue path cannot run): the logits read once.

Per chunk of ``n`` labelled tokens, ``z = h W^T`` (cuBLAS, in the hidden dtype with fp32
accumulation), then one Triton program per row makes a single pass over the row's logits, in fp32,
with an optional softcap ``s = c tanh(z / c)`` and a shift ``c``:

    e_v = exp(s_v - c)  (v != y),   S = sum_v e_v
    q_v = e_v d_v  written over z_v (q_y = 0),   d_v = ds/dz = 1 - (s_v / c_softcap)**2  (1 without softcap)

and the label's logit ``s_y`` is kept aside. Then ``R = exp(s_y - c) + S = exp(lse - c)``,
``loss = c + log R - s_y`` and ``dL/dz = (q / R - (S / R) d_y onehot(y)) / n_valid``: the softmax's
normalisation is a per-row scale applied after the matmul ``q W`` instead of in a second pass over
the logits (:mod:`.finish`). The logits are read once and written once, against three passes for a
max / sum pass followed by a gradient pass.

The shift starts at the maximum of the row's first block of columns: the row's maximum is not known
before the pass, but logits rarely spread far. Should a later block go more than ``SHIFT_LIMIT``
above it, the shift moves to that block's maximum and the blocks already written are scaled down to
match (a second read of that row's start, for such rows only). So ``e`` never overflows, and what
underflows weighs less than ``e^-87`` of the first block's maximum.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ftengine.plugins.kernels.triton.linear_cross_entropy import finish
from ftengine.plugins.kernels.triton.linear_cross_entropy.chunks import Work
from ftengine.plugins.kernels.triton.linear_cross_entropy.exp_logits_matmul import softcapped
from ftengine.plugins.kernels.triton.linear_cross_entropy.two_pass import block_columns

# the largest exp(s - shift) written: e^60 in bf16 / fp32, and 152064 of them still sum far below fp32's range
SHIFT_LIMIT = tl.constexpr(60.0)
LOG2E = tl.constexpr(1.4426950408889634)

# warps of a row's program (chosen by measurement: benchmarks/RESULTS.md, the LM head's section)
PASS_WARPS = 4


@triton.jit
def _exp_block(
    row_ptr, start, cols, n_cols, label, shift, acc, softcap,
    BLOCK_V: tl.constexpr, SOFTCAP: tl.constexpr, MASKED: tl.constexpr,
):
    """Columns ``[start, start + BLOCK_V)`` of a row: ``q`` written over them; the shift and sums carried on.

    Only the row's last block is ``MASKED`` and only the block holding the label compares columns
    with it: the other blocks, nearly all, take a load, ``exp2(s log2(e) - shift log2(e))``, a sum
    and a store per element.
    """
    idx = start + cols
    if MASKED:
        vmask = idx < n_cols
        s = softcapped(tl.load(row_ptr + idx, mask=vmask, other=0.0).to(tl.float32), softcap, SOFTCAP)
        block_max = tl.max(tl.where(vmask, s, -float("inf")), axis=0)
    else:
        s = softcapped(tl.load(row_ptr + idx).to(tl.float32), softcap, SOFTCAP)
        block_max = tl.max(s, axis=0)
    if block_max > shift + SHIFT_LIMIT:  # the first block, or a loss above SHIFT_LIMIT nats
        scale = tl.exp(shift - block_max)
        acc = acc * scale
        tl.debug_barrier()
        for done in range(0, start, BLOCK_V):
            prev = row_ptr + done + cols
            tl.store(prev, (tl.load(prev).to(tl.float32) * scale).to(row_ptr.dtype.element_ty))
        shift = block_max
    e = tl.math.exp2(s * LOG2E - shift * LOG2E)
    if MASKED:
        e = tl.where(vmask, e, 0.0)
    if (label >= start) & (label < start + BLOCK_V):
        e = tl.where(idx != label, e, 0.0)
    acc += e
    q = e
    if SOFTCAP:
        r = s / softcap
        q = e * (1.0 - r * r)
    if MASKED:
        tl.store(row_ptr + idx, q.to(row_ptr.dtype.element_ty), mask=vmask)
    else:
        tl.store(row_ptr + idx, q.to(row_ptr.dtype.element_ty))
    return shift, acc


@triton.jit
def _exp_rows_kernel(
    logits_ptr, labels_ptr, state_ptr, target_ptr, n_cols, stride_row, softcap,
    BLOCK_V: tl.constexpr, SOFTCAP: tl.constexpr,
):
    """One pass over each row's logits: ``q`` written over them.

    Leaves the row's shift and sum ``S`` in ``state`` and the label's logit in ``target``. The
    shift starts at the first block's maximum and moves up only when a later block goes more than
    ``SHIFT_LIMIT`` above it.
    """
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_V)
    row_ptr = logits_ptr + row * stride_row
    label = tl.load(labels_ptr + row).to(tl.int64)
    here = (label >= 0) & (label < n_cols)
    target = softcapped(tl.load(row_ptr + tl.where(here, label, 0)).to(tl.float32), softcap, SOFTCAP)
    tl.store(target_ptr + row, target, mask=here)
    shift = -float("inf")
    acc = tl.zeros((BLOCK_V,), tl.float32)
    n_full = n_cols // BLOCK_V * BLOCK_V
    for start in range(0, n_full, BLOCK_V):
        shift, acc = _exp_block(row_ptr, start, cols, n_cols, label, shift, acc, softcap, BLOCK_V, SOFTCAP, False)
    if n_full < n_cols:
        shift, acc = _exp_block(row_ptr, n_full, cols, n_cols, label, shift, acc, softcap, BLOCK_V, SOFTCAP, True)
    tl.store(state_ptr + 2 * row, shift)
    tl.store(state_ptr + 2 * row + 1, tl.sum(acc, axis=0))


def run(work: Work) -> None:
    """Per chunk, ``z = h W^T`` and one pass over it; then ``dh`` and ``dW`` from ``q`` (:mod:`.finish`)."""
    n_vocab = work.w.shape[0]
    block_v = block_columns(n_vocab)
    q_buffer = work.w.new_empty((work.first, n_vocab))
    state, target, coef, g = finish.buffers(work)
    for chunk in work.chunks():
        part, rows, labels, h = chunk
        n = rows.numel()
        q = q_buffer[:n]
        torch.mm(h, work.w.t(), out=q)
        _exp_rows_kernel[(n,)](
            q, labels, state[part], target[part], n_vocab, q.stride(0), work.softcap_arg,
            BLOCK_V=block_v, SOFTCAP=bool(work.softcap), num_warps=PASS_WARPS,
        )
        finish.finish_chunk(work, chunk, q, g, state, target, coef)
