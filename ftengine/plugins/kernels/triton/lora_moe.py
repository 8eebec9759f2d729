"""Mixture-of-experts MLP with LoRA (``lora_moe``) on grouped GEMMs, with a Triton grouped GEMM of its own.

Each grouped GEMM runs on ``torch._grouped_mm`` where this torch has it for the operands (see the
reference backend's ``_grouped_mm_ok``: CUDA bf16 on sm80+, CPU fp32/bf16/fp16, 16-byte aligned
rows), and otherwise on the Triton kernels below: older torch, fp32 or fp16 on a GPU, and the
low-rank LoRA products whose rank leaves rows unaligned (a rank-4 bf16 factor), which the
reference can only run one matmul per expert. NF4 expert weights are unpacked by the Triton
``dequantize_nf4`` (a whole layer's at once where they fit the reference's ``EXPERT_GROUP_BYTES``).

Rows are sorted by expert; ``offsets[e]`` is the running row count after expert ``e``. The forward
kernel walks tiles of ``BLOCK_M`` rows that never straddle two experts (a tile list built on the
device, padded to its upper bound ``ceil(S / BLOCK_M) + E`` so that no count is read back):
``y[rows_e] = x[rows_e] @ B_e`` with ``B_e`` given by strides (``W_e^T`` forward, ``W_e`` for the
input gradient). The weight gradient kernel sums each expert's rows: ``dW_e = dy_e^T x_e``.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from ftengine.plugins.kernels import reference
from ftengine.plugins.kernels.triton._expert_tiles import expert_tiles
from ftengine.plugins.kernels.triton._utils import interpreting
from ftengine.plugins.kernels.triton.dequantize_nf4 import dequantize_nf4


@triton.jit
def _grouped_mm_kernel(
    x_ptr, b_ptr, y_ptr, tile_expert_ptr, tile_start_ptr, tile_end_ptr, K, N,
    stride_xm, stride_xk, stride_be, stride_bk, stride_bn, stride_ym, stride_yn,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, FP32_DOT: tl.constexpr,
    IEEE: tl.constexpr,
):
    # y[rows, cols] = x[rows, :] @ B_e[:, cols] for the tile's expert e; a padding tile has start == end
    tile = tl.program_id(0)
    e = tl.load(tile_expert_ptr + tile).to(tl.int64)
    start = tl.load(tile_start_ptr + tile)
    end = tl.load(tile_end_ptr + tile)
    rows = start + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < end
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    k_stop = tl.where(start < end, K, 0)  # a padding tile reads nothing
    for k0 in range(0, k_stop, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        a = tl.load(x_ptr + rows[:, None].to(tl.int64) * stride_xm + ks[None, :] * stride_xk,
                    mask=row_ok[:, None] & (ks[None, :] < K), other=0.0)  # (BM, BK)
        b = tl.load(b_ptr + e * stride_be + ks[:, None] * stride_bk + cols[None, :] * stride_bn,
                    mask=(ks[:, None] < K) & (cols[None, :] < N), other=0.0)  # (BK, BN)
        if FP32_DOT:  # the CPU interpreter's bf16 dot is wrong
            a, b = a.to(tl.float32), b.to(tl.float32)
        if IEEE:  # fp32 operands get fp32 products, not TF32's
            acc += tl.dot(a, b, input_precision="ieee")
        else:
            acc += tl.dot(a, b)
    tl.store(y_ptr + rows[:, None].to(tl.int64) * stride_ym + cols[None, :] * stride_yn,
             acc.to(y_ptr.dtype.element_ty), mask=row_ok[:, None] & (cols[None, :] < N))


@triton.jit
def _grouped_weight_grad_kernel(
    x_ptr, dy_ptr, dw_ptr, offsets_ptr, K, N,
    stride_xm, stride_xk, stride_dym, stride_dyn, stride_we, stride_wn, stride_wk,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, FP32_DOT: tl.constexpr,
    IEEE: tl.constexpr,
):
    # dW_e[n, k] = sum over the rows m of expert e of dy[m, n] * x[m, k]
    e = tl.program_id(0)
    ns = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    ks = tl.program_id(2) * BLOCK_K + tl.arange(0, BLOCK_K)
    end = tl.load(offsets_ptr + e)
    start = tl.load(offsets_ptr + e - 1, mask=e > 0, other=0)
    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    for m0 in range(start, end, BLOCK_M):
        rows = m0 + tl.arange(0, BLOCK_M)
        row_ok = rows < end
        dy = tl.load(dy_ptr + rows[:, None].to(tl.int64) * stride_dym + ns[None, :] * stride_dyn,
                     mask=row_ok[:, None] & (ns[None, :] < N), other=0.0)  # (BM, BN)
        x = tl.load(x_ptr + rows[:, None].to(tl.int64) * stride_xm + ks[None, :] * stride_xk,
                    mask=row_ok[:, None] & (ks[None, :] < K), other=0.0)  # (BM, BK)
        if FP32_DOT:
            dy, x = dy.to(tl.float32), x.to(tl.float32)
        if IEEE:
            acc += tl.dot(tl.trans(dy), x, input_precision="ieee")
        else:
            acc += tl.dot(tl.trans(dy), x)
    tl.store(dw_ptr + e.to(tl.int64) * stride_we + ns[:, None] * stride_wn + ks[None, :] * stride_wk,
             acc.to(dw_ptr.dtype.element_ty), mask=(ns[:, None] < N) & (ks[None, :] < K))


def _blocks() -> tuple[int, int, int]:
    """``(BLOCK_M, BLOCK_N, BLOCK_K)``: small tiles in the interpreter (a program costs ~1 ms there)."""
    return (16, 16, 16) if interpreting() else (64, 64, 32)


def _grouped_mm(x: torch.Tensor, b: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """``y[rows_e] = x[rows_e] @ b[e]``: x ``(S, K)`` sorted by expert, b ``(E, K, N)`` (any strides)."""
    n_rows, k = x.shape
    n = b.shape[2]
    y = x.new_empty(n_rows, n)
    if n_rows == 0 or b.shape[0] == 0:
        return y.zero_()
    block_m, block_n, block_k = _blocks()
    expert, start, end = expert_tiles(offsets, n_rows, block_m)
    grid = (expert.shape[0], triton.cdiv(n, block_n))
    _grouped_mm_kernel[grid](
        x, b, y, expert, start, end, k, n, x.stride(0), x.stride(1), b.stride(0), b.stride(1), b.stride(2),
        y.stride(0), y.stride(1), BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, FP32_DOT=interpreting(),
        IEEE=x.dtype == torch.float32,
    )
    return y


def _weight_grad(x: torch.Tensor, dy: torch.Tensor, offsets: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``dW_e = dy_e^T x_e`` for a weight ``(E, N, K)``; an expert without rows gets zeros."""
    dw = torch.empty_like(weight, memory_format=torch.contiguous_format)
    n_experts, n, k = weight.shape
    block_m, block_n, block_k = _blocks()
    grid = (n_experts, triton.cdiv(n, block_n), triton.cdiv(k, block_k))
    _grouped_weight_grad_kernel[grid](
        x, dy, dw, offsets, k, n, x.stride(0), x.stride(1), dy.stride(0), dy.stride(1), dw.stride(0), dw.stride(1),
        dw.stride(2), BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, FP32_DOT=interpreting(),
        IEEE=x.dtype == torch.float32,
    )
    return dw


class _GroupedGemm(torch.autograd.Function):
    """``y_e = x_e W_e^T`` per expert.  Backward: ``dx_e = dy_e W_e`` (the same kernel, ``W_e`` through its
    strides instead of ``W_e^T``) and ``dW_e = dy_e^T x_e`` (summed over the expert's rows)."""

    @staticmethod
    def forward(ctx, x, weight, offsets):
        ctx.save_for_backward(x, weight, offsets)
        return _grouped_mm(x, weight.transpose(-2, -1), offsets)

    @staticmethod
    def backward(ctx, grad):
        x, weight, offsets = ctx.saved_tensors
        grad = grad.contiguous()
        dx = _grouped_mm(grad, weight, offsets) if ctx.needs_input_grad[0] else None
        dw = _weight_grad(x, grad, offsets, weight) if ctx.needs_input_grad[1] else None
        return dx, dw, None


def grouped_gemm(x: torch.Tensor, weight: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """The reference backend's ``grouped_linear`` (same arguments and result) on the Triton kernels."""
    return _GroupedGemm.apply(x, weight.to(x.dtype), offsets.to(torch.int32))


def grouped_linear(x: torch.Tensor, weight: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """``torch._grouped_mm`` where it takes the operands, else :func:`grouped_gemm`."""
    if reference._grouped_mm_ok(x, weight.to(x.dtype)):
        return reference.grouped_linear(x, weight, offsets)
    return grouped_gemm(x, weight, offsets)


lora_moe = functools.partial(
    reference.lora_moe, linear=grouped_linear,
    nf4_linear=functools.partial(reference.nf4_grouped_linear, linear=grouped_linear, dequantize=dequantize_nf4))
"""The ``lora_moe`` op on :func:`grouped_linear`, NF4 experts unpacked by the Triton ``dequantize_nf4``."""
