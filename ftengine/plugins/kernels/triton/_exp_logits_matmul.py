"""``h W^T`` with the cross-entropy's exponentials in the epilogue: the logits are written once, never re-read.

For a chunk of rows, each with a reference logit ``r`` (its label's logit, computed beforehand by
:func:`label_logits`), the matmul's epilogue turns the fp32 accumulator ``z`` into, per element,

    s = z, soft-capped (c tanh(z / c)) when asked (fp32: the logits never exist in bf16 here)
    e = exp(min(s - r, EXP_CLAMP))                      0 in the label's column and past the vocabulary
    q = e * (1 - (s / c)**2)   (softcap)   or   q = e   (no softcap)

and writes ``q`` in bf16 where the plain matmul would write the logits, plus, per row and tile of
columns, the partial sum of ``e`` and the label's own ``s``. Then the row's softmax is ``p_v = e_v
/ R`` with ``R = exp(s_y - r) + sum(e)``, so ``dL/dz = q / R - (1 - p_y) d_y onehot(y)`` is ``q``
scaled per row: ``dL/dh = (q W) / R - (1 - p_y) d_y W[y]`` is a plain matmul over ``q`` and a row
scale. No pass over the logits reads them back.

Why the label's logit as ``r``: ``s_v - r`` then stays below ``loss + log`` of a few, so ``e``
neither overflows (bf16 and fp32 share their exponent range) nor loses the values that matter to
underflow. A row whose loss is so large that ``e`` could overflow (``log R`` above
:data:`TRUSTED_LOG_RATIO`) is flagged by the caller and recomputed exactly; ``EXP_CLAMP`` only
keeps such a row's ``q`` finite meanwhile, so it cannot poison other rows through ``dL/dW``.

The matmul is persistent (one program per multiprocessor, column tiles outer, row tiles inner so
that the programs running at once share each column block of ``W`` through L2) and loads its tiles
through tensor descriptors (the H100's bulk copy engine).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from ftengine.plugins.kernels.triton._utils import interpreting
from ftengine.plugins.kernels.triton._utils import num_persistent_programs

EXP_CLAMP = tl.constexpr(64.0)
# log R above this: some e_v may have been clamped, the row is recomputed exactly
TRUSTED_LOG_RATIO = tl.constexpr(60.0)

# H100, 8192 tokens 3584 -> 152064 (see benchmarks/RESULTS.md); small tiles when interpreting on the CPU
GPU_CONFIG = {"BLOCK_M": 128, "BLOCK_N": 256, "BLOCK_K": 64, "SPLIT_N": 2, "num_stages": 4, "num_warps": 8,
              "programs_per_sm": 1}
INTERPRETER_CONFIG = {"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 16, "SPLIT_N": 2, "num_stages": 1, "num_warps": 4,
                      "programs_per_sm": 1}


def config() -> dict:
    return INTERPRETER_CONFIG if interpreting() else GPU_CONFIG


def supported(hidden: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether :func:`exp_logits` can take these operands: bf16, rows 16-byte aligned for the copy engine."""
    return (
        hidden.dtype == torch.bfloat16 and weight.dtype == torch.bfloat16
        and (hidden.is_cuda or interpreting())
        and hidden.shape[1] % 8 == 0 and hidden.data_ptr() % 16 == 0 and weight.data_ptr() % 16 == 0
    )


@triton.jit
def softcapped(z, softcap, SOFTCAP: tl.constexpr):
    if SOFTCAP:
        # c tanh(z / c), tanh(x) = 1 - 2 / (exp(2x) + 1) with the argument clamped (fp32 saturates at |x| > 20)
        x = tl.minimum(tl.maximum(z / softcap, -20.0), 20.0)
        z = softcap * (1.0 - 2.0 / (tl.exp(2.0 * x) + 1.0))
    return z


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
    h_ptr, w_ptr, rows_ptr, labels_ptr, out_ptr, n_hidden, n_vocab, stride_h, stride_w, softcap,
    BLOCK_H: tl.constexpr, SOFTCAP: tl.constexpr,
):
    i = tl.program_id(0)
    row = tl.load(rows_ptr + i).to(tl.int64)
    label = tl.load(labels_ptr + i).to(tl.int64)
    label = tl.where((label >= 0) & (label < n_vocab), label, 0)
    cols = tl.arange(0, BLOCK_H)
    acc = tl.zeros((BLOCK_H,), tl.float32)
    for start in range(0, n_hidden, BLOCK_H):
        mask = start + cols < n_hidden
        h = tl.load(h_ptr + row * stride_h + start + cols, mask=mask, other=0.0).to(tl.float32)
        w = tl.load(w_ptr + label * stride_w + start + cols, mask=mask, other=0.0).to(tl.float32)
        acc += h * w
    tl.store(out_ptr + i, softcapped(tl.sum(acc, axis=0), softcap, SOFTCAP))


def label_logits(hidden: torch.Tensor, weight: torch.Tensor, rows: torch.Tensor, labels: torch.Tensor,
                 softcap: float | None) -> torch.Tensor:
    """``s[i] = softcap(hidden[rows[i]] . weight[labels[i]])`` in fp32 (label 0 where out of range)."""
    out = torch.empty(rows.numel(), dtype=torch.float32, device=hidden.device)
    if rows.numel():
        _label_logit_kernel[(rows.numel(),)](
            hidden, weight, rows, labels, out, hidden.shape[1], weight.shape[0], hidden.stride(0), weight.stride(0),
            float(softcap) if softcap else 1.0, BLOCK_H=256 if interpreting() else 1024, SOFTCAP=bool(softcap),
        )
    return out


@triton.jit
def _epilogue(z, rows, row_mask, col0, ref, labels, q_desc, target_ptr, off_m, n_vocab, softcap,
              BLOCK_N: tl.constexpr, SOFTCAP: tl.constexpr, INTERPRETED: tl.constexpr):
    """One ``(BLOCK_M, BLOCK_N)`` piece of the accumulator starting at column ``col0``; returns its row sums of e."""
    cols = col0 + tl.arange(0, BLOCK_N)
    s = softcapped(z, softcap, SOFTCAP)
    e = tl.exp(tl.minimum(s - ref[:, None], EXP_CLAMP))
    labelled = row_mask & (labels >= col0) & (labels < col0 + BLOCK_N) & (labels < n_vocab)
    # most tiles hold no row's label and lie inside the vocabulary: they skip the masking
    if (col0 + BLOCK_N > n_vocab) | (tl.max(labelled.to(tl.int32), axis=0) > 0):
        is_label = cols[None, :] == labels[:, None]
        e = tl.where((cols[None, :] < n_vocab) & ~is_label, e, 0.0)
        tl.store(target_ptr + rows, tl.sum(tl.where(is_label, s, 0.0), axis=1), mask=labelled)
    q = e
    if SOFTCAP:
        r = s / softcap
        q = e * (1.0 - r * r)
    q_desc.store([off_m, col0], rounded_bf16(q, INTERPRETED))
    return tl.sum(e, axis=1)


@triton.jit
def _exp_logits_kernel(
    a_desc, b_desc, q_desc, ref_ptr, labels_ptr, sums_ptr, target_ptr, n_rows, n_vocab, n_hidden, softcap,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_N: tl.constexpr,
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
        if SPLIT_N == 2:  # two halves: fewer live registers in the epilogue
            halves = tl.permute(tl.reshape(acc, (BLOCK_M, 2, BLOCK_N // 2)), (0, 2, 1))
            left, right = tl.split(halves)
            part = _epilogue(left, rows, row_mask, off_n, ref, labels, q_desc, target_ptr, off_m, n_vocab, softcap,
                             BLOCK_N // 2, SOFTCAP, INTERPRETED)
            part += _epilogue(right, rows, row_mask, off_n + BLOCK_N // 2, ref, labels, q_desc, target_ptr, off_m,
                              n_vocab, softcap, BLOCK_N // 2, SOFTCAP, INTERPRETED)
        else:
            part = _epilogue(acc, rows, row_mask, off_n, ref, labels, q_desc, target_ptr, off_m, n_vocab, softcap,
                             BLOCK_N, SOFTCAP, INTERPRETED)
        tl.store(sums_ptr + rows * tiles_n + tile_n, part, mask=row_mask)


def exp_logits(
    hidden: torch.Tensor, weight: torch.Tensor, ref: torch.Tensor, labels: torch.Tensor, softcap: float | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``q`` ``(n, V)`` (a view with rows padded to 16 bytes), per-tile sums ``(n, tiles)`` and label logits ``(n,)``.

    ``hidden`` ``(n, H)`` and ``weight`` ``(V, H)`` are bf16 (see :func:`supported`); ``ref`` and
    ``labels`` are per row. A label outside ``[0, V)`` matches no column; its target stays unset.
    """
    cfg = config()
    n, n_hidden = hidden.shape
    n_vocab = weight.shape[0]
    padded = -(-n_vocab // 8) * 8
    q = torch.empty((n, padded), dtype=hidden.dtype, device=hidden.device)[:, :n_vocab]
    tiles_n = triton.cdiv(n_vocab, cfg["BLOCK_N"])
    sums = torch.empty((n, tiles_n), dtype=torch.float32, device=hidden.device)
    target = torch.empty(n, dtype=torch.float32, device=hidden.device)
    bm, bn, bk = cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["BLOCK_K"]
    a_desc = TensorDescriptor.from_tensor(hidden, [bm, bk])
    b_desc = TensorDescriptor.from_tensor(weight, [bn, bk])
    q_desc = TensorDescriptor.from_tensor(q, [bm, bn // cfg["SPLIT_N"]])
    programs = min(num_persistent_programs(hidden.device, per_sm=cfg["programs_per_sm"]), triton.cdiv(n, bm) * tiles_n)
    _exp_logits_kernel[(programs,)](
        a_desc, b_desc, q_desc, ref, labels, sums, target, n, n_vocab, n_hidden,
        float(softcap) if softcap else 1.0, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, SPLIT_N=cfg["SPLIT_N"],
        SOFTCAP=bool(softcap), INTERPRETED=interpreting(), NUM_PROGRAMS=programs,
        num_stages=cfg["num_stages"], num_warps=cfg["num_warps"],
    )
    return q, sums, target
