"""``h W^T`` with the cross-entropy's exponentials in its epilogue: the logits are written once, as ``q``.

For a chunk of rows, each with its label's logit ``r`` (:func:`label_logits`, computed first), the
matmul's epilogue turns the fp32 accumulator ``z`` into, per element,

    s = z, soft-capped (c tanh(z / c)) when asked
    e = exp(min(s - r, EXP_CLAMP))          0 in the label's column and past the vocabulary
    q = e * (1 - (s / c)**2)  (softcap)   or   q = e

and writes ``q`` in bf16 where a plain matmul would write the logits, plus, per row and tile of
columns, the sum of ``e`` and the largest ``s - r``. :func:`settle_rows` then reduces those to the
row's shift and sum, the state the LM head's finish kernel takes (``R = exp(s_y - r) + sum(e) = 1 +
sum(e)``): no pass over the logits reads them back.

Why the label's logit as the shift: ``s - r`` stays below the token's loss plus a few nats, so for
any loss under ``EXP_CLAMP`` nats nothing overflows and what underflows weighs less than ``e^-87``
of the label's own term. A row with a larger ``s - r`` somewhere (a loss above ~64 nats) had those
tiles clamped; :func:`settle_rows` moves its shift to the row's maximum, recomputes the clamped
tiles' logits from ``h`` and ``W`` (a few tiles: they are the ones above the clamp) and rescales
the others, so such rows come out exact too.

The matmul is persistent (one program per multiprocessor, column tiles outer and row tiles inner,
so the programs running at once share each block of ``W`` through L2) and loads its tiles through
tensor descriptors (the Hopper copy engine). Its time and energy against cuBLAS' matmul followed by
a pass over the logits: benchmarks/RESULTS.md.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ftengine.plugins.kernels.triton._utils import interpreting
from ftengine.plugins.kernels.triton._utils import num_persistent_programs

try:
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:  # Triton before 3.3 has no host-side tensor descriptors
    TensorDescriptor = None

# the largest s - r the epilogue exponentiates: e^64 and 152,064 of them stay far inside bf16's and fp32's range
EXP_CLAMP = tl.constexpr(64.0)
LOG2E = tl.constexpr(1.4426950408889634)

# the tile shape and pipeline depth chosen by measurement (benchmarks/RESULTS.md, the LM head's section)
GPU_CONFIG = {"BLOCK_M": 128, "BLOCK_N": 256, "BLOCK_K": 64, "num_stages": 4, "num_warps": 8}
INTERPRETER_CONFIG = {"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 16, "num_stages": 1, "num_warps": 4}


def config() -> dict:
    return INTERPRETER_CONFIG if interpreting() else GPU_CONFIG


def supported(hidden: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether :func:`exp_logits` takes these operands: bf16 on a Hopper or later GPU, rows 16-byte aligned."""
    if TensorDescriptor is None or hidden.dtype != torch.bfloat16 or weight.dtype != torch.bfloat16:
        return False
    if not interpreting() and not (hidden.is_cuda and torch.cuda.get_device_capability(hidden.device)[0] >= 9):
        return False
    return hidden.shape[1] % 8 == 0 and hidden.data_ptr() % 16 == 0 and weight.data_ptr() % 16 == 0


def tile_columns() -> int:
    """Columns per tile of the matmul: the granularity of the per-row sums and maxima."""
    return config()["BLOCK_N"]


@triton.jit
def softcapped(z, softcap, SOFTCAP: tl.constexpr):
    if SOFTCAP:
        # c tanh(z / c), tanh(x) = 1 - 2 / (exp(2x) + 1) with the argument clamped (fp32 saturates at |x| > 20)
        x = tl.minimum(tl.maximum(z / softcap, -20.0), 20.0)
        z = softcap * (1.0 - 2.0 / (tl.exp(2.0 * x) + 1.0))
    return z


@triton.jit
def _softcap_slope(s, softcap, SOFTCAP: tl.constexpr):
    """``ds/dz`` at ``s = c tanh(z / c)``: ``1 - (s / c)**2`` (1 without softcap)."""
    if SOFTCAP:
        r = s / softcap
        slope = 1.0 - r * r
    else:
        slope = 1.0
    return slope


@triton.jit
def rounded_bf16(x, INTERPRETED: tl.constexpr):
    """``x`` (fp32) to bf16, rounding to nearest even: the interpreter's own cast truncates."""
    if INTERPRETED:
        bits = x.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        x = bits.to(tl.float32, bitcast=True)
    return x.to(tl.bfloat16)


@triton.jit
def _label_logit_kernel(
    h_ptr, w_ptr, labels_ptr, out_ptr, n_hidden, n_vocab, stride_h, stride_w, softcap,
    BLOCK_H: tl.constexpr, SOFTCAP: tl.constexpr,
):
    i = tl.program_id(0).to(tl.int64)
    label = tl.load(labels_ptr + i).to(tl.int64)
    label = tl.where((label >= 0) & (label < n_vocab), label, 0)
    cols = tl.arange(0, BLOCK_H)
    acc = tl.zeros((BLOCK_H,), tl.float32)
    for start in range(0, n_hidden, BLOCK_H):
        mask = start + cols < n_hidden
        h = tl.load(h_ptr + i * stride_h + start + cols, mask=mask, other=0.0).to(tl.float32)
        w = tl.load(w_ptr + label * stride_w + start + cols, mask=mask, other=0.0).to(tl.float32)
        acc += h * w
    tl.store(out_ptr + i, softcapped(tl.sum(acc, axis=0), softcap, SOFTCAP))


def label_logits(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, softcap: float | None,
                 out: torch.Tensor) -> None:
    """``out[i] = softcap(hidden[i] . weight[labels[i]])`` in fp32 (label 0 where out of range)."""
    if hidden.shape[0]:
        _label_logit_kernel[(hidden.shape[0],)](
            hidden, weight, labels, out, hidden.shape[1], weight.shape[0], hidden.stride(0), weight.stride(0),
            float(softcap) if softcap else 1.0, BLOCK_H=256 if interpreting() else 1024, SOFTCAP=bool(softcap),
        )


@triton.jit
def _epilogue(z, rows, row_mask, col0, ref, labels, q_desc, off_m, n_vocab, softcap,
              BLOCK_N: tl.constexpr, SOFTCAP: tl.constexpr, INTERPRETED: tl.constexpr):
    """One ``(BLOCK_M, BLOCK_N)`` piece of the accumulator from column ``col0``: ``q`` stored, row sums and maxima."""
    cols = col0 + tl.arange(0, BLOCK_N)
    s = softcapped(z, softcap, SOFTCAP)
    above = s - ref[:, None]
    e = tl.math.exp2(tl.minimum(above, EXP_CLAMP) * LOG2E)
    labelled = row_mask & (labels >= col0) & (labels < col0 + BLOCK_N)
    # nearly every tile holds no row's label and lies inside the vocabulary: those skip the masking
    if (col0 + BLOCK_N > n_vocab) | (tl.max(labelled.to(tl.int32), axis=0) > 0):
        keep = (cols[None, :] < n_vocab) & (cols[None, :] != labels[:, None])
        e = tl.where(keep, e, 0.0)
        above = tl.where(cols[None, :] < n_vocab, above, -float("inf"))
    q_desc.store([off_m, col0], rounded_bf16(e * _softcap_slope(s, softcap, SOFTCAP), INTERPRETED))
    return tl.sum(e, axis=1), tl.max(above, axis=1)


@triton.jit
def _exp_logits_kernel(
    a_desc, b_desc, q_desc, ref_ptr, labels_ptr, sums_ptr, maxes_ptr, n_rows, n_vocab, n_hidden, softcap,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    SOFTCAP: tl.constexpr, INTERPRETED: tl.constexpr, NUM_PROGRAMS: tl.constexpr,
):
    tiles_m = tl.cdiv(n_rows, BLOCK_M)
    tiles_n = tl.cdiv(n_vocab, BLOCK_N)
    k_steps = tl.cdiv(n_hidden, BLOCK_K)
    for tile in tl.range(tl.program_id(0), tiles_m * tiles_n, NUM_PROGRAMS, flatten=True):
        tile_m = tile % tiles_m
        tile_n = tile // tiles_m
        off_m = tile_m * BLOCK_M
        off_n = tile_n * BLOCK_N
        acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
        for k in range(k_steps):
            a = a_desc.load([off_m, k * BLOCK_K])
            b = b_desc.load([off_n, k * BLOCK_K])
            if INTERPRETED:  # the interpreter's bf16 dot is wrong
                a = a.to(tl.float32)
                b = b.to(tl.float32)
            acc = tl.dot(a, b.T, acc)
        rows = off_m + tl.arange(0, BLOCK_M)
        row_mask = rows < n_rows
        ref = tl.load(ref_ptr + rows, mask=row_mask, other=0.0)
        labels = tl.load(labels_ptr + rows, mask=row_mask, other=-1)
        # two halves of the columns, one after the other: fewer live registers in the epilogue
        left, right = tl.split(tl.permute(tl.reshape(acc, (BLOCK_M, 2, BLOCK_N // 2)), (0, 2, 1)))
        sum_l, max_l = _epilogue(left, rows, row_mask, off_n, ref, labels, q_desc, off_m, n_vocab, softcap,
                                 BLOCK_N // 2, SOFTCAP, INTERPRETED)
        sum_r, max_r = _epilogue(right, rows, row_mask, off_n + BLOCK_N // 2, ref, labels, q_desc, off_m, n_vocab,
                                 softcap, BLOCK_N // 2, SOFTCAP, INTERPRETED)
        tl.store(sums_ptr + rows * tiles_n + tile_n, sum_l + sum_r, mask=row_mask)
        tl.store(maxes_ptr + rows * tiles_n + tile_n, tl.maximum(max_l, max_r), mask=row_mask)


def exp_logits(hidden: torch.Tensor, weight: torch.Tensor, ref: torch.Tensor, labels: torch.Tensor,
               softcap: float | None, q: torch.Tensor, sums: torch.Tensor, maxes: torch.Tensor) -> None:
    """Writes ``q`` ``(n, V)`` and, per row and tile of :func:`tile_columns` columns, ``sums`` and ``maxes``.

    ``hidden`` ``(n, H)`` and ``weight`` ``(V, H)`` are bf16 (see :func:`supported`); ``ref`` is each
    row's label logit (:func:`label_logits`); ``q``'s rows are 16-byte aligned (a view of a padded
    buffer); ``sums`` and ``maxes`` are ``(n, tiles)`` fp32. A label outside ``[0, V)`` matches no column.
    """
    cfg = config()
    n, n_hidden = hidden.shape
    n_vocab = weight.shape[0]
    bm, bn, bk = cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["BLOCK_K"]
    tiles = triton.cdiv(n, bm) * triton.cdiv(n_vocab, bn)
    programs = min(num_persistent_programs(hidden.device, per_sm=1), tiles)
    _exp_logits_kernel[(programs,)](
        TensorDescriptor.from_tensor(hidden, [bm, bk]), TensorDescriptor.from_tensor(weight, [bn, bk]),
        TensorDescriptor.from_tensor(q, [bm, bn // 2]), ref, labels, sums, maxes, n, n_vocab, n_hidden,
        float(softcap) if softcap else 1.0, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, SOFTCAP=bool(softcap),
        INTERPRETED=interpreting(), NUM_PROGRAMS=programs, num_stages=cfg["num_stages"], num_warps=cfg["num_warps"],
    )


@triton.jit
def _settle_rows_kernel(
    q_ptr, h_ptr, w_ptr, labels_ptr, ref_ptr, sums_ptr, maxes_ptr, state_ptr, n_vocab, n_hidden, n_tiles,
    stride_q, stride_h, stride_w, softcap,
    TILE_N: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr, SOFTCAP: tl.constexpr,
    INTERPRETED: tl.constexpr,
):
    """A row's shift and sum from its tiles'; a row with a tile past ``EXP_CLAMP`` redone at its maximum.

    Such a row's shift becomes ``c = r + max(s - r)``; its clamped tiles get their logits again
    (``h . W_v`` in fp32) and the others are scaled by ``exp(r - c)``, ``q`` and sums alike.
    """
    i = tl.program_id(0).to(tl.int64)
    ref = tl.load(ref_ptr + i)
    label = tl.load(labels_ptr + i).to(tl.int64)
    ts = tl.arange(0, BLOCK_T)
    total = tl.zeros((BLOCK_T,), tl.float32)
    top = tl.full((BLOCK_T,), -float("inf"), tl.float32)
    for t0 in range(0, n_tiles, BLOCK_T):
        tmask = t0 + ts < n_tiles
        total += tl.load(sums_ptr + i * n_tiles + t0 + ts, mask=tmask, other=0.0)
        top = tl.maximum(top, tl.load(maxes_ptr + i * n_tiles + t0 + ts, mask=tmask, other=-float("inf")))
    top_row = tl.max(top, axis=0)
    valid = (label >= 0) & (label < n_vocab)  # a row without a label keeps its clamped values: it weighs nothing
    if valid & (top_row > EXP_CLAMP):
        shift = ref + top_row
        scale = tl.exp(-top_row)
        total_row = 0.0
        cols = tl.arange(0, TILE_N)
        ks = tl.arange(0, BLOCK_H)
        for t in range(0, n_tiles):
            idx = t * TILE_N + cols
            vmask = idx < n_vocab
            if tl.load(maxes_ptr + i * n_tiles + t) > EXP_CLAMP:
                z = tl.zeros((TILE_N,), tl.float32)
                for k0 in range(0, n_hidden, BLOCK_H):
                    kmask = k0 + ks < n_hidden
                    h = tl.load(h_ptr + i * stride_h + k0 + ks, mask=kmask, other=0.0).to(tl.float32)
                    w = tl.load(w_ptr + idx[:, None] * stride_w + (k0 + ks)[None, :],
                                mask=vmask[:, None] & kmask[None, :], other=0.0).to(tl.float32)
                    z += tl.sum(w * h[None, :], axis=1)
                s = softcapped(z, softcap, SOFTCAP)
                e = tl.where(vmask & (idx != label), tl.exp(s - shift), 0.0)
                total_row += tl.sum(e, axis=0)
                q = e * _softcap_slope(s, softcap, SOFTCAP)
            else:
                q = tl.load(q_ptr + i * stride_q + idx, mask=vmask, other=0.0).to(tl.float32) * scale
                total_row += tl.load(sums_ptr + i * n_tiles + t) * scale
            tl.store(q_ptr + i * stride_q + idx, rounded_bf16(q, INTERPRETED), mask=vmask)
        tl.store(state_ptr + 2 * i, shift)
        tl.store(state_ptr + 2 * i + 1, total_row)
    else:
        tl.store(state_ptr + 2 * i, ref)
        tl.store(state_ptr + 2 * i + 1, tl.sum(total, axis=0))


def settle_rows(q: torch.Tensor, hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                ref: torch.Tensor, sums: torch.Tensor, maxes: torch.Tensor, softcap: float | None,
                state: torch.Tensor) -> None:
    """Each row's ``(shift, sum of e)`` into ``state`` ``(n, 2)``, from :func:`exp_logits`' tiles."""
    n, n_tiles = sums.shape
    if n:
        _settle_rows_kernel[(n,)](
            q, hidden, weight, labels, ref, sums, maxes, state, weight.shape[0], weight.shape[1], n_tiles,
            q.stride(0), hidden.stride(0), weight.stride(0), float(softcap) if softcap else 1.0,
            TILE_N=tile_columns(), BLOCK_T=256 if interpreting() else 1024, BLOCK_H=16 if interpreting() else 32,
            SOFTCAP=bool(softcap), INTERPRETED=interpreting(),
        )
