"""LM head fused with cross-entropy, in token chunks: the ``(N, V)`` logits never exist at once.

Only the tokens with a label take part: the ignored ones (prompts, padding) have no loss and no
gradient, so their rows are left out of every matmul. Chunk sizes need their count on the host;
it is copied there behind the work already queued, and the first chunk (a full one: the first
labelled rows, padded when there are fewer) is queued before the host waits for it, so the GPU
does not idle behind that sync while the host launches the next kernels (a profile of the
host-counts-first order showed gaps of 0.1-0.2 ms between the first small kernels, ~1 ms per
call).

Three paths compute the same per-row quantities. bf16 on a Hopper GPU (``_fused_pass``): a Triton
matmul writes ``q`` below straight from its epilogue, shifted by the label's logit
(``_exp_logits_matmul``), so no pass reads the logits back; cuBLAS then makes ``q W``. Elsewhere
(``_single_pass``: fp32, or bf16 without tensor descriptors) the vocabulary is split into
``VOCAB_PARTS`` parts. Per chunk of ``n`` such tokens and per part ``p``, ``z_p = h W_p^T``
(cuBLAS, in the hidden dtype with fp32 accumulation), then one Triton program per row makes a
single pass over the part's logits, in fp32, with an optional softcap ``s = c tanh(z / c)`` and
a shift ``c_p`` (see below):

    e_v = exp(s_v - c_p)  (v != y),   S_p = sum_{v in p} e_v
    q_v = e_v d_v  written over z_v (q_y = 0),   d_v = ds/dz = 1 - (s_v / c)**2  (1 without softcap)

and the label's logit ``s_y`` is kept aside. A row's parts then combine: ``C = max_p c_p``,
``S = sum_p S_p exp(c_p - C)``, ``R = exp(s_y - C) + S = exp(lse - C)``, ``loss = C + log R - s_y``
and ``dL/dz_p = (exp(c_p - C) q_p / R - (S / R) d_y onehot(y)) / n_valid``: the softmax's
normalisation is a per-row scale, applied after the matmuls ``q_p W_p`` instead of in a second
pass over the logits. Hence ``dh = sum_p a_p (q_p W_p) - b W[y]`` with ``a_p = exp(c_p - C) /
(R n_valid)``, ``b = (S / R) d_y / n_valid`` (``1 - p_y = S / R`` has no cancellation), and
``dW_p += q_p^T (a_p h) - scatter(b h)``. The logits are read once and written once, against
three passes for a max / sum pass followed by a gradient pass.

The shift starts at the maximum of the part's first block of columns: the row's maximum is not
known before the pass, but logits rarely spread far. Should a later block go more than
``SHIFT_LIMIT`` above it, the shift moves to that block's maximum and the blocks already written
are scaled down to match (a second read of that row's start, for such rows only). So ``e`` never
overflows, and what underflows weighs less than ``e^-87`` of the first block's maximum. fp16's
range is too narrow for ``e``: it takes the two-pass kernel (max / sum, then the gradient).

Why parts: on a GPU each pass runs on a side stream, and the matmul ``q_p W_p`` of a part is
issued after the next part's logits, so that the next part's pass runs beside it. cuBLAS' kernels
for that matmul leave a few multiprocessors idle (grids of 112-126 blocks on an H100's 132),
which the memory-bound pass fills. The chunks' rows are multiples of ``TILE_ROWS``, so the
matmuls' tiles cover them exactly.

All of this happens in the forward: the loss is a scalar, so the backward only scales the stored
gradients by the incoming one. Peak extra memory: one chunk of logits plus the gradients.

Measured on an H100 (8192 tokens, 500 ignored, 3584 -> 152064, bf16, alternating rounds of one
run): counting behind the first chunk and the pass's lighter blocks (``_exp_block``) 26.60 ms
against 27.32 for the op before them (4096 -> 128256: 25.90 against 26.82); alone, the lighter
pass over one part (1,152 x 76,032) 150 us and 66 mJ against 159 us and 71 mJ (a copy of the
same bytes: 120 us, 46 mJ). Earlier: the one-part op (chunks of 1,282 rows) 27.04 ms, one part in
whole tiles 26.98 ms, two parts 26.81 ms (five more such runs: benchmarks/RESULTS.md); the split
``q_p W_p`` alone costs 3% of that matmul (720 against 745 TFLOP/s). No faster: three to eight
parts, with or without larger chunks at equal memory (two part buffers in turn; fewer reads of
``W``, but the matmuls alone no faster: 24.7-25.6 ms against 24.3); more idle multiprocessors for
the pass (cuBLAS' SM count target, 8 to 32 left free: 27.3-30.3 ms against 26.8); the matmuls on
a stream of higher priority than the passes (27.24 against 27.19); the vocabulary-major order
(all tokens against one part at a time, ``dh`` accumulated in fp32: its matmuls alone 26.2-26.6
ms against 25.3 for this order's). Running a whole chunk's pass under the next chunk's logits
needs two chunk buffers: no faster at equal memory. Faster than all of these where it runs: no
pass at all, ``q`` from the epilogue of a Triton matmul (``_fused_pass`` has the figures).
"""

from __future__ import annotations

import collections
import contextlib
import functools
import itertools
from collections.abc import Iterator

import torch
import triton
import triton.language as tl

from ftengine.plugins.kernels.triton import _exp_logits_matmul as exp_logits_matmul
from ftengine.plugins.kernels.triton._exp_logits_matmul import softcapped
from ftengine.plugins.kernels.triton._op_registry import register_op
from ftengine.plugins.kernels.triton._utils import interpreting
from ftengine.plugins.kernels.triton._utils import next_power_of_2

# Logit bytes per chunk at most. H100, 8192 tokens (500 ignored) 3584 -> 152064, two parts, alternating rounds:
# 7 chunks of 1,024-1,152 rows 26.81 ms at a 0.41 GiB peak; 8 chunks of 896-1,024 rows 28.95 ms; 6 chunks of
# 1,280-1,292 rows (416 MiB) 27.57 ms. 368 MiB: chunks of at most 1,152 rows there, 1,408 for 4096 -> 128256.
CHUNK_BYTES = 368 * 1024 * 1024

# the largest exp(s - shift) written: e^60 in bf16 / fp32, and 152064 of them still sum far below fp32's range
SHIFT_LIMIT = tl.constexpr(60.0)
LOG2E = tl.constexpr(1.4426950408889634)

# parts of the vocabulary per chunk (module docstring); three or four were no faster than two
VOCAB_PARTS = 2

# warps of a row's program in the one-pass kernel. H100, the pass over 1,152 x 76,032 alone: 152 us at 4 warps, 150 at
# 8 (16: 150 us; blocks of 2,048 or 8,192 columns no faster); the whole op (alternating rounds, Qwen shapes) 25.97
# ms at 4 against 26.66 at 8 in one run, 26.02 against 26.00 in another: beside cuBLAS' matmul the pass has only
# the few idle multiprocessors, which smaller programs fill at least as well
PASS_WARPS = 4

# chunk rows come in multiples of this (the matmuls' tile height): rows of 64 were 1.2 ms slower, of 192 or 256 0.3-0.5
TILE_ROWS = 128


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
    logits_ptr, labels_ptr, state_ptr, target_ptr, v_offset, n_cols, stride_row, softcap,
    BLOCK_V: tl.constexpr, SOFTCAP: tl.constexpr,
):
    """One pass over columns ``[v_offset, v_offset + n_cols)`` of each row: ``q`` written over them.

    Leaves the part's shift and sum ``S_p`` in ``state`` and, in the part that holds the label,
    the label's logit in ``target``. The shift starts at the first block's maximum and moves up
    only when a later block goes more than ``SHIFT_LIMIT`` above it.
    """
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_V)
    row_ptr = logits_ptr + row * stride_row
    label = tl.load(labels_ptr + row).to(tl.int64) - v_offset
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


@triton.jit
def _finish_rows_kernel(
    state_ptr, target_ptr, labels_ptr, rows_ptr, loss_ptr, coef_ptr, g_ptr, w_ptr, dh_ptr, inv_n_valid, n_vocab,
    n_rows, n_hidden, stride_state, stride_coef, stride_g_part, stride_g, stride_w, stride_dh, softcap,
    PARTS: tl.constexpr, PARTS_POW2: tl.constexpr, SOFTCAP: tl.constexpr, WRITE_DH: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    """A row's loss and coefficients from its parts' shifts and sums; with ``WRITE_DH``, its ``dh``.

    ``C = max_p c_p``, ``S = sum_p S_p exp(c_p - C)``, ``R = exp(s_y - C) + S``: ``loss = C + log R - s_y``,
    ``a_p = exp(c_p - C) / (R n_valid)``, ``b = (S / R) d_y / n_valid`` and ``dh = sum_p a_p g_p - b W[y]``
    with ``g_p = q_p W_p`` from the parts' matmuls.
    """
    i = tl.program_id(0).to(tl.int64)
    label = tl.load(labels_ptr + i).to(tl.int64)
    valid = (label >= 0) & (label < n_vocab)
    parts = tl.arange(0, PARTS_POW2)
    pmask = parts < PARTS
    shifts = tl.load(state_ptr + parts * stride_state + 2 * i, mask=pmask, other=-float("inf"))
    top = tl.max(shifts, axis=0)
    scales = tl.exp(shifts - top)
    rest = tl.sum(tl.load(state_ptr + parts * stride_state + 2 * i + 1, mask=pmask, other=0.0) * scales, axis=0)
    target = tl.load(target_ptr + i)
    ratio = tl.exp(target - top) + rest  # exp(lse - C)
    d_y = 1.0
    if SOFTCAP:
        c = target / softcap
        d_y = 1.0 - c * c
    a = tl.where(valid, scales * (inv_n_valid / ratio), 0.0)
    b = tl.where(valid, inv_n_valid * (rest / ratio) * d_y, 0.0)
    tl.store(loss_ptr + i, tl.where(valid, top + tl.log(ratio) - target, 0.0))
    tl.store(coef_ptr + i * stride_coef + parts, a, mask=pmask)
    tl.store(coef_ptr + i * stride_coef + PARTS, b)
    if WRITE_DH:
        safe_label = tl.where(valid, label, 0)
        row = tl.load(rows_ptr + i).to(tl.int64)
        cols = tl.arange(0, BLOCK_H)
        for start in range(0, n_hidden, BLOCK_H):
            mask = (start + cols < n_hidden) & (row < n_rows)  # a padding row of the first chunk stores nothing
            w = tl.load(w_ptr + safe_label * stride_w + start + cols, mask=mask, other=0.0).to(tl.float32)
            acc = -b * w
            for part in tl.static_range(PARTS):
                a_p = tl.sum(tl.where(parts == part, a, 0.0), axis=0)
                g = tl.load(g_ptr + part * stride_g_part + i * stride_g + start + cols, mask=mask, other=0.0)
                acc += a_p * g.to(tl.float32)
            tl.store(dh_ptr + row * stride_dh + start + cols, acc.to(dh_ptr.dtype.element_ty), mask=mask)


def _labelled_first(mask: torch.Tensor, fill: int) -> torch.Tensor:
    """The indices of ``mask``'s true entries in order, then ``fill`` up to ``mask``'s length, without a host sync.

    ``torch.nonzero_static`` does this, but on CUDA only from torch 2.6.
    """
    n = mask.numel()
    slot = torch.where(mask, mask.cumsum(0) - 1, n)  # the others land in a spare last slot
    out = torch.full((n + 1,), fill, dtype=torch.long, device=mask.device)
    return out.scatter_(0, slot, torch.arange(n, device=mask.device))[:n]


def _rows_per_chunk(row_bytes: int) -> int:
    """The most rows whose logits fit in ``CHUNK_BYTES``."""
    return max(1, CHUNK_BYTES // max(1, row_bytes))


def _chunk_bounds(n_rows: int, per_chunk: int) -> list[int]:
    """Chunk boundaries: at most ``per_chunk`` rows each, in whole tiles of rows but the last, near-equal.

    Near-equal: no small last matmul. Fewer than ``TILE_ROWS`` rows per chunk drops the tiles.
    """
    if per_chunk < TILE_ROWS:
        n_chunks = -(-n_rows // per_chunk)
        return [i * n_rows // n_chunks for i in range(n_chunks + 1)]
    tiles = -(-n_rows // TILE_ROWS)
    n_chunks = -(-tiles // (per_chunk // TILE_ROWS))
    return [min(n_rows, TILE_ROWS * (i * tiles // n_chunks)) for i in range(n_chunks + 1)]


def _block_v(n_cols: int) -> int:
    """Vocabulary columns a row's program loads at a time."""
    return min(next_power_of_2(n_cols), 1024 if interpreting() else 4096)


def single_pass_suits(dtype: torch.dtype) -> bool:
    """fp16's exponent range is too narrow for ``exp(s - shift)``: it takes the exact two-pass kernel."""
    return dtype != torch.float16


def _dw_dtype(weight: torch.Tensor, hidden: torch.Tensor) -> torch.dtype:
    """``dL/dW`` accumulates in fp32 for an fp32 weight, else in the hidden dtype."""
    return torch.float32 if weight.dtype == torch.float32 else hidden.dtype


class _Work:
    """What both passes share: the inputs, the labelled rows, and the outputs they fill.

    The number of labelled rows is copied to the host behind the work already queued and read
    only when a pass needs it. With ``speculate``, the first chunk is taken before that: the first
    labelled rows of a chunk's size (:func:`_labelled_first`, padded with out-of-range rows that have no
    label and store nothing), so its matmuls are queued while the host waits for the count and
    the GPU never idles behind that sync.
    """

    def __init__(self, hidden, w, labels, ignore_index, softcap, need_dh, dw, speculate):
        self.hidden, self.w, self.labels, self.softcap, self.need_dh, self.dw = hidden, w, labels, softcap, need_dh, dw
        self.n_rows = hidden.shape[0]
        self.labelled = labels != ignore_index
        count = self.labelled.sum()
        self._counted = None
        if count.is_cuda:
            self._count = torch.empty((), dtype=count.dtype, pin_memory=True).copy_(count, non_blocking=True)
            self._counted = torch.cuda.Event()
            self._counted.record(torch.cuda.current_stream(count.device))  # the LM head's device, not the current one
        else:
            self._count = count
        self.softcap_arg = float(softcap) if softcap else 1.0  # the kernels' argument (unused without softcap)
        self.per_chunk = _rows_per_chunk(self.w.shape[0] * self.w.element_size())
        # the first chunk is a full one (in whole tiles), so its buffers serve every later chunk
        full = self.per_chunk // TILE_ROWS * TILE_ROWS if self.per_chunk >= TILE_ROWS else self.per_chunk
        self.first = min(self.n_rows, full) if speculate else 0
        self.losses = torch.zeros(self.n_rows, dtype=torch.float32, device=hidden.device)

    @functools.cached_property
    def n_valid(self) -> int:
        """The labelled rows' count (waits for it, once)."""
        if self._counted is not None:
            self._counted.synchronize()
        return int(self._count)

    @property
    def compact(self) -> bool:
        return self.n_valid < self.n_rows

    @property
    def inv_n_valid(self) -> float:
        return 1.0 / max(1, self.n_valid)

    @functools.cached_property
    def dh(self) -> torch.Tensor:
        """``dL/dhidden`` (empty when not asked for); zeros where rows are ignored, so it waits for the count."""
        if not self.need_dh:
            return self.hidden.new_empty(0)
        return torch.zeros_like(self.hidden) if self.compact else torch.empty_like(self.hidden)

    def chunks(self) -> Iterator[tuple[slice, torch.Tensor, torch.Tensor, torch.Tensor]]:
        """Per chunk of labelled rows: its slice of them, their row indices, labels and hidden states."""
        rows = _labelled_first(self.labelled, self.n_rows)
        if self.first:
            head = rows[:self.first]
            inside = head.clamp(max=self.n_rows - 1)
            labels = torch.where(head < self.n_rows, self.labels.index_select(0, inside), -1)
            yield slice(0, self.first), head, labels, self.hidden.index_select(0, inside)
        if self.n_valid <= self.first:
            return
        rows = rows[:self.n_valid]
        labels = self.labels.index_select(0, rows) if self.compact else self.labels
        bounds = [self.first + b for b in _chunk_bounds(self.n_valid - self.first, self.per_chunk)]
        for start, stop in itertools.pairwise(bounds):
            h = self.hidden.index_select(0, rows[start:stop]) if self.compact else self.hidden[start:stop]
            yield slice(start, stop), rows[start:stop], labels[start:stop], h


def _exact_pass(work: _Work) -> None:
    """Per chunk, a max / sum pass and a gradient pass over the logits."""
    for part, rows, labels, h in work.chunks():
        logits = h @ work.w.t()
        _ce_chunk_kernel[(rows.numel(),)](
            logits, labels, work.losses[part], work.inv_n_valid, work.w.shape[0], logits.stride(0), work.softcap_arg,
            BLOCK_V=_block_v(work.w.shape[0]), SOFTCAP=bool(work.softcap),
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


def _finish_chunk(work: _Work, chunk: tuple, edges: list[int], buffers: list[torch.Tensor], g: torch.Tensor,
                  state: torch.Tensor, target: torch.Tensor, coef: torch.Tensor) -> None:
    """A chunk's losses, its rows of ``dh`` from the parts' ``g_p = q_p W_p`` and, with ``dW``, its share of that.

    ``state`` holds each part's row shifts and sums, ``target`` the label logits, ``edges`` the
    parts' first columns, ``buffers`` their ``q``; ``coef`` receives the per-row scales ``a_p``, ``b``.
    """
    part, rows, labels, h = chunk
    n = rows.numel()
    n_vocab, n_hidden = work.w.shape
    n_parts = len(buffers)
    _finish_rows_kernel[(n,)](
        state[:, part], target[part], labels, rows, work.losses[part], coef[part], g, work.w, work.dh,
        work.inv_n_valid, n_vocab, work.n_rows, n_hidden, state.stride(0), coef.stride(0), g.stride(0), g.stride(1),
        work.w.stride(0), work.dh.stride(0) if work.dh.numel() else 0, work.softcap_arg,
        PARTS=n_parts, PARTS_POW2=next_power_of_2(n_parts), SOFTCAP=bool(work.softcap),
        WRITE_DH=work.dh.numel() > 0, BLOCK_H=256 if interpreting() else 1024,
    )
    if work.dw.numel():
        for q, (a, b), scale in zip(buffers, itertools.pairwise(edges), coef[part, :n_parts].t(), strict=True):
            work.dw[a:b].addmm_(q[:n].t().to(work.dw.dtype), (h * scale[:, None]).to(work.dw.dtype))
        work.dw.index_add_(0, labels.clamp(0, n_vocab - 1), (h * -coef[part, n_parts:]).to(work.dw.dtype))


def _fused_pass(work: _Work) -> None:
    """Per chunk, ``q`` straight from the logits matmul's epilogue (``_exp_logits_matmul``); ``dh`` from ``q W``.

    One vocabulary part: no pass runs beside the matmuls, so nothing is gained by splitting them.
    H100, 8192 tokens (500 ignored), alternating rounds against the two-part pass over cuBLAS'
    logits in two runs: 3584 -> 152064 25.71 against 26.24 ms (8 of 8 rounds faster) and 25.95
    against 26.34 (4 of 6); 4096 -> 128256 24.29 against 25.48 and 24.96 against 26.09 (6 of 6).
    The Triton matmul takes ~3% more energy than cuBLAS' (677 against 656 mJ over 1,152 x 3584 ->
    76,032 in a sustained loop), less than the pass it saves (cuBLAS' matmul then the pass: 765 mJ);
    at the H100's 700 W cap the energy sets the time.
    """
    n_vocab, n_hidden = work.w.shape
    device = work.hidden.device
    tiles = -(-n_vocab // exp_logits_matmul.tile_columns())
    padded = -(-n_vocab // 8) * 8  # q's rows 16-byte aligned for the copy engine
    buffer = work.w.new_empty((work.first, padded))[:, :n_vocab]
    g = work.w.new_empty((1, work.first, n_hidden)) if work.need_dh else work.w.new_empty((1, 1, 1))
    sums = torch.empty((work.first, tiles), dtype=torch.float32, device=device)
    maxes = torch.empty_like(sums)
    state = torch.empty((1, work.n_rows, 2), dtype=torch.float32, device=device)
    target = torch.zeros(work.n_rows, dtype=torch.float32, device=device)
    coef = torch.empty((work.n_rows, 2), dtype=torch.float32, device=device)
    for chunk in work.chunks():
        part, rows, labels, h = chunk
        n = rows.numel()
        q = buffer[:n]
        exp_logits_matmul.label_logits(h, work.w, labels, work.softcap, target[part])
        exp_logits_matmul.exp_logits(h, work.w, target[part], labels, work.softcap, q, sums[:n], maxes[:n])
        exp_logits_matmul.settle_rows(q, h, work.w, labels, target[part], sums[:n], maxes[:n], work.softcap,
                                      state[0, part])
        if work.need_dh:
            torch.mm(q, work.w, out=g[0, :n])
        _finish_chunk(work, chunk, [0, n_vocab], [buffer], g, state, target, coef)


_side_streams: dict[torch.device, torch.cuda.Stream] = {}


def _side_stream(device: torch.device) -> torch.cuda.Stream:
    """The stream the passes run on, beside the main stream's matmuls (one per device, made once)."""
    if device not in _side_streams:
        _side_streams[device] = torch.cuda.Stream(device, priority=-1)
    return _side_streams[device]


def _single_pass(work: _Work) -> None:
    """Per chunk and vocabulary part, ``z_p = h W_p^T`` and one pass over it; then ``dh`` from ``q_p W_p``.

    The matmul ``q_p W_p`` of a part is issued one part late, after the next part's logits, and on a
    GPU each pass runs on a side stream: so the pass over one part runs beside the ``q W`` of the
    part before it, whose cuBLAS kernel leaves some multiprocessors idle. Without ``dW`` this runs
    on across chunks (a part's buffer is free once its ``q_p W_p`` is issued); ``dW`` needs every
    part's ``q`` until the chunk's row statistics are known, so each chunk then ends on its own.
    """
    n_vocab, n_hidden = work.w.shape
    device = work.hidden.device
    n_parts = max(1, min(VOCAB_PARTS, n_vocab))
    edges = [p * n_vocab // n_parts for p in range(n_parts + 1)]
    block_v = _block_v(edges[1])
    w_parts = [work.w[a:b] for a, b in itertools.pairwise(edges)]
    buffers = [work.w.new_empty((work.first, wp.shape[0])) for wp in w_parts]
    g = work.w.new_empty((n_parts, work.first, n_hidden)) if work.need_dh else work.w.new_empty((1, 1, 1))
    state = torch.empty((n_parts, work.n_rows, 2), dtype=torch.float32, device=device)
    target = torch.zeros(work.n_rows, dtype=torch.float32, device=device)
    coef = torch.empty((work.n_rows, n_parts + 1), dtype=torch.float32, device=device)
    main = torch.cuda.current_stream(device) if device.type == "cuda" and n_parts > 1 else None
    side = _side_stream(device) if main is not None else None
    across_chunks = n_parts > 1 and not work.dw.numel()
    pending: collections.deque = collections.deque()  # (chunk, part index, its pass's event)

    def consume(chunk, p, passed):
        n = chunk[1].numel()
        if passed is not None:
            main.wait_event(passed)
        if work.need_dh:
            torch.mm(buffers[p][:n], w_parts[p], out=g[p, :n])
        if p == n_parts - 1:
            _finish_chunk(work, chunk, edges, buffers, g, state, target, coef)

    for chunk in work.chunks():
        part, rows, labels, h = chunk
        n = rows.numel()
        for p, wp in enumerate(w_parts):
            z = buffers[p][:n]
            torch.mm(h, wp.t(), out=z)
            passed = None
            if side is not None:
                side.wait_stream(main)
            with torch.cuda.stream(side) if side is not None else contextlib.nullcontext():
                _exp_rows_kernel[(n,)](
                    z, labels, state[p, part], target[part], edges[p], z.shape[1], z.stride(0), work.softcap_arg,
                    BLOCK_V=block_v, SOFTCAP=bool(work.softcap), num_warps=PASS_WARPS,
                )
                if side is not None:
                    passed = torch.cuda.Event()
                    passed.record(side)
            pending.append((chunk, p, passed))
            if len(pending) > 1:
                consume(*pending.popleft())
        while pending and not across_chunks:
            consume(*pending.popleft())
    while pending:
        consume(*pending.popleft())


def fused_forward(
    hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, ignore_index: int, softcap: float | None,
    need_dh: bool, need_dw: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Loss (fp32 scalar) and, as asked, ``dL/dhidden`` and ``dL/dW`` for a unit upstream gradient.

    ``hidden`` is ``(N, H)`` and ``labels`` ``(N,)``, both contiguous; a gradient not asked for
    comes back as an empty tensor. No autograd.
    """
    w = weight.to(hidden.dtype).contiguous()
    dw = weight.new_empty(0)
    if need_dw:
        dw = torch.zeros(weight.shape, dtype=_dw_dtype(weight, hidden), device=weight.device)
    if hidden.shape[0] == 0:  # nothing to chunk
        dh = torch.zeros_like(hidden) if need_dh else hidden.new_empty(0)
        return hidden.new_zeros((), dtype=torch.float32), dh, dw
    single = single_pass_suits(hidden.dtype)
    work = _Work(hidden, w, labels, ignore_index, softcap, need_dh, dw, speculate=single)
    if not single:
        _exact_pass(work)
    elif exp_logits_matmul.supported(hidden, w):
        _fused_pass(work)
    else:
        _single_pass(work)
    return work.losses.sum() / max(1, work.n_valid), work.dh, dw


def _fused_forward_fake(hidden, weight, labels, ignore_index, softcap, need_dh, need_dw):
    loss = hidden.new_empty((), dtype=torch.float32)
    dh = torch.empty_like(hidden) if need_dh else hidden.new_empty(0)
    dw = weight.new_empty(weight.shape, dtype=_dw_dtype(weight, hidden)) if need_dw else weight.new_empty(0)
    return loss, dh, dw


# the loss and both gradients in one opaque op: the compiler sees neither the launches nor the host sync
_fused_forward_op = register_op("linear_cross_entropy_forward", fused_forward, fake=_fused_forward_fake)


@triton.jit
def _scale_kernel(x_ptr, scale_ptr, out_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    scale = tl.load(scale_ptr).to(tl.float32)
    x = tl.load(x_ptr + offs, mask=mask).to(tl.float32)
    tl.store(out_ptr + offs, (x * scale).to(out_ptr.dtype.element_ty), mask=mask)


def scaled(x: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    """``x * scale`` as ``dtype`` (``x``'s by default), in fp32; ``scale`` is a 0-dim tensor on ``x``'s device.

    Why a kernel: PyTorch's product with a 0-dim device tensor takes its unvectorised broadcasting
    path, 102 us over an 8192 x 3584 bf16 gradient on an H100 against this kernel's 41 us; reading
    ``scale`` on the host instead would wait for the whole forward.
    """
    out = torch.empty(x.shape, dtype=dtype or x.dtype, device=x.device)
    if x.numel():
        block = 1024 if interpreting() else 4096
        _scale_kernel[(triton.cdiv(x.numel(), block),)](x.contiguous(), scale.reshape(()), out, x.numel(), BLOCK=block)
    return out


def _scaled_fake(x, scale, dtype):
    return torch.empty(x.shape, dtype=dtype or x.dtype, device=x.device)


_scaled_op = register_op("linear_cross_entropy_scale", scaled, fake=_scaled_fake)


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
        dh = _scaled_op(saved.pop(0), grad_out, None) if ctx.has[0] else None
        dw = _scaled_op(saved.pop(0), grad_out, ctx.weight_dtype) if ctx.has[1] else None
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
