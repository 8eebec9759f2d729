"""Grouped GEMM over NF4 expert weights, unpacked inside the GEMM (``nf4_grouped_linear``).

``y_e = x_e W_e^T`` for every expert ``e`` at once, ``W`` ``(E, out, in)`` stored as
``quantize_nf4`` packs it (one row of bytes per expert, two 4-bit codes a byte with the high nibble
first, one absmax per 64 values, double-quantized or not). Each program decodes the 64-value
blocks of ``W_e`` its tile needs straight into registers, so neither a 16-bit copy of the experts
nor a count read back to the host exists: the tile list is built on the device
(:func:`expert_tiles`). Backward: ``dx_e = dy_e W_e``, the same kernel reading ``W_e`` untransposed;
the base weight is frozen and gets no gradient.

Decoding rounds as ``dequantize_nf4`` does (level times absmax in fp32, the double-quantized absmax
as ``code2[q] * absmax2 + offset`` with no fused multiply-add, one rounding to the weight dtype),
so the products are those of ``dequantize_nf4`` followed by a grouped GEMM.
"""

from __future__ import annotations

from typing import Any

import torch
import triton
import triton.language as tl

from ftengine.plugins.kernels.triton._expert_tiles import expert_tiles
from ftengine.plugins.kernels.triton._utils import interpreting
from ftengine.plugins.kernels.triton.dequantize_nf4 import _levels

BLOCKSIZE = 64
"""The NF4 block the kernel decodes in one piece; each tile of ``W`` is whole blocks of one row."""
FORWARD_LAUNCH = (64, 128, 4, 3)
"""``(BLOCK_M, BLOCK_N, num_warps, num_stages)`` of ``y = x W^T`` (``BLOCK_K`` is :data:`BLOCKSIZE`)."""
BACKWARD_LAUNCH = (64, 64, 4, 3)
"""``(BLOCK_M, BLOCK_K, num_warps, num_stages)`` of ``dx = dy W`` (``BLOCK_N`` is :data:`BLOCKSIZE`)."""


@triton.jit
def _decode(packed_ptr, absmax_ptr, code2_ptr, absmax2_ptr, offset_ptr, levels_ptr, e, w_rows, col0, n_rows,
            w_cols, expert_blocks, expert_groups, group, NESTED: tl.constexpr, BLOCK: tl.constexpr):
    # W_e[w_rows, col0:col0 + BLOCK] in fp32, rows past n_rows as zeros; one absmax a row (BLOCK == blocksize)
    half: tl.constexpr = BLOCK // 2
    row_ok = w_rows < n_rows
    first = w_rows.to(tl.int64) * w_cols + col0  # the element each row's block starts at, within expert e
    byte = tl.load(packed_ptr + e * (expert_blocks * half) + first[:, None] // 2 + tl.arange(0, half)[None, :],
                   mask=row_ok[:, None], other=0).to(tl.int32)  # (R, half)
    block = e * expert_blocks + first // BLOCK  # (R,)
    if NESTED:
        q = tl.load(absmax_ptr + block, mask=row_ok, other=0).to(tl.int32)
        scale = tl.load(code2_ptr + q) * tl.load(absmax2_ptr + e * expert_groups + (first // BLOCK) // group,
                                                 mask=row_ok, other=0.0)
        scale = scale + tl.load(offset_ptr)
    else:
        scale = tl.load(absmax_ptr + block, mask=row_ok, other=0.0).to(tl.float32)
    hi = tl.load(levels_ptr + (byte >> 4)) * scale[:, None]
    lo = tl.load(levels_ptr + (byte & 15)) * scale[:, None]
    values = tl.reshape(tl.join(hi, lo), (w_rows.shape[0], BLOCK))  # (hi0, lo0, hi1, lo1, ...) per row
    return tl.where(row_ok[:, None], values, 0.0)


@triton.jit
def _nf4_grouped_mm_kernel(
    x_ptr, packed_ptr, absmax_ptr, code2_ptr, absmax2_ptr, offset_ptr, levels_ptr, y_ptr,
    tile_expert_ptr, tile_start_ptr, tile_end_ptr, K, N, w_cols, expert_blocks, expert_groups, group,
    stride_xm, stride_xk, stride_ym, stride_yn,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, TRANSPOSED: tl.constexpr,
    NESTED: tl.constexpr, FP32_DOT: tl.constexpr, IEEE: tl.constexpr,
):
    # y[rows, cols] = x[rows, :] @ B_e[:, cols], B_e = W_e^T (TRANSPOSED) or W_e; padding tiles have start == end
    tile = tl.program_id(0)
    start = tl.load(tile_start_ptr + tile)
    end = tl.load(tile_end_ptr + tile)
    e = tl.load(tile_expert_ptr + tile).to(tl.int64)
    rows = start + tl.arange(0, BLOCK_M)
    row_ok = rows < end
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    k_stop = tl.where(start < end, K, 0)  # a padding tile decodes nothing and stores nothing
    for k0 in range(0, k_stop, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        a = tl.load(x_ptr + rows[:, None].to(tl.int64) * stride_xm + ks[None, :] * stride_xk,
                    mask=row_ok[:, None] & (ks[None, :] < K), other=0.0)  # (BM, BK)
        if TRANSPOSED:  # W_e[cols, k0:k0 + BK]: BK == BLOCKSIZE
            b = tl.trans(_decode(packed_ptr, absmax_ptr, code2_ptr, absmax2_ptr, offset_ptr, levels_ptr, e, cols,
                                 k0, N, w_cols, expert_blocks, expert_groups, group, NESTED, BLOCK_K))
        else:  # W_e[ks, n0:n0 + BN]: BN == BLOCKSIZE
            b = _decode(packed_ptr, absmax_ptr, code2_ptr, absmax2_ptr, offset_ptr, levels_ptr, e, ks,
                        tl.program_id(1) * BLOCK_N, K, w_cols, expert_blocks, expert_groups, group, NESTED, BLOCK_N)
        b = b.to(x_ptr.dtype.element_ty)  # the weight as dequantize_nf4 rounds it
        if FP32_DOT:  # the CPU interpreter's bf16 dot is wrong
            a, b = a.to(tl.float32), b.to(tl.float32)
        if IEEE:
            acc += tl.dot(a, b, input_precision="ieee")
        else:
            acc += tl.dot(a, b)
    tl.store(y_ptr + rows[:, None].to(tl.int64) * stride_ym + cols[None, :] * stride_yn,
             acc.to(y_ptr.dtype.element_ty), mask=row_ok[:, None] & (cols[None, :] < N))


def fusable(x: torch.Tensor, state: Any) -> bool:
    """Whether the kernel takes these operands: ``(E, out, in)`` NF4 in blocks of :data:`BLOCKSIZE` that never
    straddle two rows of an expert (``in`` a multiple of it), ``x`` in the weight's dtype, a GPU or the
    interpreter."""
    return (getattr(state, "quant_type", "nf4") == "nf4" and int(state.blocksize) == BLOCKSIZE
            and len(state.shape) == 3 and state.shape[-1] % BLOCKSIZE == 0 and x.dtype == state.dtype
            and (x.is_cuda or interpreting()))


def _launch(x: torch.Tensor, packed: torch.Tensor, state: Any, offsets: torch.Tensor, transposed: bool) -> torch.Tensor:
    n_experts, out_features, in_features = state.shape
    k, n = (in_features, out_features) if transposed else (out_features, in_features)
    y = x.new_empty(x.shape[0], n)
    if x.shape[0] == 0:
        return y
    if transposed:
        block_m, block_n, warps, stages = FORWARD_LAUNCH
        block_k = BLOCKSIZE
    else:
        block_m, block_k, warps, stages = BACKWARD_LAUNCH
        block_n = BLOCKSIZE
    if interpreting():  # small tiles: a program costs ~1 ms there
        block_m = 16
        block_n, block_k = (16, block_k) if transposed else (block_n, 16)
    expert, start, end = expert_tiles(offsets, x.shape[0], block_m)
    expert_blocks = out_features * in_features // BLOCKSIZE
    if state.nested:
        code2, absmax2, group = state.state2.code, state.state2.absmax, int(state.state2.blocksize)
        offset = torch.as_tensor(state.offset, dtype=torch.float32, device=x.device)
        expert_groups = absmax2.shape[-1]
    else:
        code2 = absmax2 = offset = state.absmax  # not read
        group, expert_groups = 1, 1
    grid = (expert.shape[0], triton.cdiv(n, block_n))
    _nf4_grouped_mm_kernel[grid](
        x, packed.view(torch.uint8), state.absmax, code2, absmax2, offset, _levels(x.device), y, expert, start, end,
        k, n, in_features, expert_blocks, expert_groups, group, x.stride(0), x.stride(1), y.stride(0), y.stride(1),
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, TRANSPOSED=transposed, NESTED=bool(state.nested),
        FP32_DOT=interpreting(), IEEE=x.dtype == torch.float32, num_warps=warps, num_stages=stages,
        enable_fp_fusion=False,
    )
    return y


class _NF4GroupedGemm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, packed, state, offsets):
        ctx.save_for_backward(packed, offsets)
        ctx.state = state
        return _launch(x.contiguous(), packed, state, offsets, transposed=True)

    @staticmethod
    def backward(ctx, grad):
        packed, offsets = ctx.saved_tensors
        return _launch(grad.contiguous(), packed, ctx.state, offsets, transposed=False), None, None, None


def nf4_grouped_gemm(x: torch.Tensor, packed: torch.Tensor, state: Any, offsets: torch.Tensor) -> torch.Tensor:
    """``y_e = x_e W_e^T`` per expert with ``W`` NF4 (frozen; :func:`fusable` operands).

    Args:
        x: ``(S, in)``, rows sorted by expert.
        packed, state: ``W`` as ``quantize_nf4`` returns it, ``state.shape == (E, out, in)``.
        offsets: ``(E,)``, the running row count after each expert.

    Returns:
        ``(S, out)`` in ``x``'s dtype; differentiable in ``x``.
    """
    return _NF4GroupedGemm.apply(x, packed, state, offsets.to(torch.int32))
