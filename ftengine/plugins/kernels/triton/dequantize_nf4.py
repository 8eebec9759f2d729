"""bitsandbytes NF4 dequantization in Triton, bit-identical to ``bitsandbytes.functional.dequantize_4bit``.

Layout: two 4-bit codes per byte, the high nibble first; element ``i`` is
``NF4[code_i] * absmax[i // blocksize]``. With double quantization the absmax itself is stored
as uint8 codes into a 256-entry table with its own fp32 absmax per ``blocksize2`` blocks, plus an
offset: ``absmax[b] = code2[q_b] * absmax2[b // blocksize2] + offset``. Products and the sum are
rounded separately in fp32, as bitsandbytes does (fused multiply-add is switched off for the
launch), and the fp32 value is rounded once to the output dtype.
"""

from __future__ import annotations

from typing import Any

import torch
import triton
import triton.language as tl

from ftengine.plugins.kernels.triton._op_registry import register_op

# The 16 NF4 levels (normal quantiles scaled to [-1, 1]), as bitsandbytes defines them.
NF4_LEVELS = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
)
# H100 sweep, 14336x4096: 1024 bytes with 2 warps 0.059 ms; 4 warps 0.063; 2048 bytes with 4 warps 0.060
BYTES_PER_PROGRAM = 1024
NUM_WARPS = 2
_tables: dict[torch.device, torch.Tensor] = {}


@triton.jit
def _dequantize_nf4_kernel(
    packed_ptr, out_ptr, levels_ptr, absmax_ptr, code2_ptr, absmax2_ptr, offset_ptr, n_elements, blocksize2,
    BLOCKSIZE: tl.constexpr, BLOCKS_PER_PROG: tl.constexpr, NESTED: tl.constexpr, BF16_BITS: tl.constexpr,
):
    # a tile of BLOCKS_PER_PROG quantization blocks x BLOCKSIZE // 2 bytes: one absmax per tile row
    half: tl.constexpr = BLOCKSIZE // 2
    block = tl.program_id(0).to(tl.int64) * BLOCKS_PER_PROG + tl.arange(0, BLOCKS_PER_PROG)  # (NB,)
    n_bytes = (n_elements + 1) // 2
    n_blocks = tl.cdiv(n_elements, BLOCKSIZE)
    block_mask = block < n_blocks
    if NESTED:
        q = tl.load(absmax_ptr + block, mask=block_mask, other=0).to(tl.int32)
        scale = tl.load(code2_ptr + q, mask=block_mask, other=0.0) * tl.load(absmax2_ptr + block // blocksize2,
                                                                             mask=block_mask, other=0.0)
        scale = scale + tl.load(offset_ptr)
    else:
        scale = tl.load(absmax_ptr + block, mask=block_mask, other=0.0).to(tl.float32)
    byte_idx = block[:, None] * half + tl.arange(0, half)[None, :]  # (NB, half)
    bmask = byte_idx < n_bytes
    byte = tl.load(packed_ptr + byte_idx, mask=bmask, other=0).to(tl.int32)
    hi = tl.load(levels_ptr + (byte >> 4)) * scale[:, None]
    lo = tl.load(levels_ptr + (byte & 15)) * scale[:, None]
    vals = tl.reshape(tl.join(hi, lo), (BLOCKS_PER_PROG, BLOCKSIZE))  # (hi0, lo0, hi1, lo1, ...) per block
    out_idx = block[:, None] * BLOCKSIZE + tl.arange(0, BLOCKSIZE)[None, :]
    out_mask = out_idx < n_elements
    if BF16_BITS:
        # fp32 -> bf16 round-to-nearest-even on the bits (the CPU interpreter's own cast truncates);
        # the values are finite, and out_ptr is the output viewed as int16
        bits = vals.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        tl.store(out_ptr + out_idx, bits.to(tl.int16), mask=out_mask)
    else:
        tl.store(out_ptr + out_idx, vals.to(out_ptr.dtype.element_ty), mask=out_mask)


def _levels(device: torch.device) -> torch.Tensor:
    table = _tables.get(device)
    if table is None:
        table = _tables[device] = torch.tensor(NF4_LEVELS, dtype=torch.float32, device=device)
    return table


def _dequantize(
    packed: torch.Tensor, absmax: torch.Tensor, code2: torch.Tensor | None, absmax2: torch.Tensor | None,
    offset: torch.Tensor | None, blocksize: int, blocksize2: int, shape: list[int], dtype: torch.dtype,
) -> torch.Tensor:
    """The kernel on a QuantState's tensors: ``code2``, ``absmax2`` and ``offset`` are given when nested."""
    out = torch.empty(shape, dtype=dtype, device=packed.device)
    n = out.numel()
    if n == 0:
        return out
    nested = code2 is not None
    if not nested:
        code2 = absmax2 = offset = absmax  # not read
    bf16 = out.dtype == torch.bfloat16
    blocks_per_prog = max(1, BYTES_PER_PROGRAM // (blocksize // 2))
    grid = (triton.cdiv(triton.cdiv(n, blocksize), blocks_per_prog),)
    _dequantize_nf4_kernel[grid](
        packed, out.view(torch.int16) if bf16 else out, _levels(packed.device), absmax, code2, absmax2, offset, n,
        blocksize2, BLOCKSIZE=blocksize, BLOCKS_PER_PROG=blocks_per_prog, NESTED=nested, BF16_BITS=bf16,
        num_warps=NUM_WARPS, enable_fp_fusion=False,
    )
    return out


def _dequantize_fake(packed, absmax, code2, absmax2, offset, blocksize, blocksize2, shape, dtype):
    return packed.new_empty(shape, dtype=dtype)


_dequantize_op = register_op("dequantize_nf4", _dequantize, fake=_dequantize_fake)


def dequantize_nf4(packed: torch.Tensor, quant_state: Any) -> torch.Tensor:
    """Unpack a bitsandbytes NF4 tensor.

    Args:
        packed: the packed bytes (any shape, ``ceil(n / 2)`` bytes), as ``Params4bit`` holds them: uint8, or
            the dtype of bitsandbytes' ``quant_storage`` (read as uint8).
        quant_state: its bitsandbytes ``QuantState`` (``absmax``, ``blocksize``, ``shape``, ``dtype``,
            and ``state2``/``offset`` when the absmax is double-quantized).

    Returns:
        The weight, ``quant_state.shape`` in ``quant_state.dtype``.

    Raises:
        ValueError: a quantization type other than NF4, or a blocksize that is not a power of two.
    """
    quant_type = getattr(quant_state, "quant_type", "nf4")
    if quant_type != "nf4":
        raise ValueError(f"dequantize_nf4 handles quant_type 'nf4', got {quant_type!r}")
    blocksize = int(quant_state.blocksize)
    if blocksize < 2 or blocksize & (blocksize - 1):
        raise ValueError(f"dequantize_nf4 needs a power-of-two blocksize, got {blocksize}")
    code2 = absmax2 = offset = None
    blocksize2 = 1
    if getattr(quant_state, "nested", False):
        s2 = quant_state.state2
        code2, absmax2, blocksize2 = s2.code, s2.absmax, int(s2.blocksize)
        offset = torch.as_tensor(quant_state.offset, dtype=torch.float32, device=packed.device)
    if type(packed) is not torch.Tensor:
        # bitsandbytes' Params4bit overrides __torch_function__: every op, attribute read and kernel
        # launch on it would pass through Python; a plain alias of the same storage does not
        packed = packed.as_subclass(torch.Tensor)
    if packed.dtype != torch.uint8:  # quant_storage: the same bytes held as another dtype (FSDP shards them)
        packed = packed.contiguous().view(torch.uint8)
    return _dequantize_op(packed, quant_state.absmax, code2, absmax2, offset, blocksize, blocksize2,
                          list(quant_state.shape), quant_state.dtype)
