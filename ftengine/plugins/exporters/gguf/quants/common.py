"""Helpers shared by the quantizers: the compute device, row chunking, fp16 packing, rounding.

Every quantizer takes a 2-D float tensor ``(rows, cols)`` whose ``cols`` is a multiple of its block
size and returns the GGUF bytes as a ``(rows, cols // block_size * type_size)`` uint8 numpy array.
Work happens in float32: on the GPU when there is one, else on the CPU, where chunks of rows go to
one worker thread per core, each running torch single-threaded (torch's own intra-op threads on
these small element-wise ops spend more time synchronising than computing).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

CHUNK_ELEMENTS_CPU = 1 << 18
"""Elements one CPU worker quantizes at once: the temporaries of a chunk stay in cache."""

CHUNK_ELEMENTS_CUDA = 1 << 26
"""Elements quantized at once on a GPU: big enough to keep it busy, small enough for its memory."""


def compute_device() -> torch.device:
    """The device quantization runs on: the current CUDA device when there is one, else the CPU."""
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def round_half_away(x: torch.Tensor) -> torch.Tensor:
    """C's ``roundf``: halves round away from zero (``torch.round`` rounds them to even)."""
    return torch.sign(x) * torch.floor(x.abs() + 0.5)


def fp16_bytes(x: torch.Tensor) -> torch.Tensor:
    """``(n, 1)`` float values as their little-endian IEEE half bytes, ``(n, 2)`` uint8."""
    return x.to(torch.float16).contiguous().view(torch.uint8)


def as_fp16(x: torch.Tensor) -> torch.Tensor:
    """``x`` rounded to half precision and back, as the stored value a decoder will read."""
    return x.to(torch.float16).to(torch.float32)


def by_row_chunks(
    tensor: torch.Tensor,
    block_size: int,
    quantize_blocks: Callable[..., torch.Tensor],
    device: torch.device | None = None,
    importance: torch.Tensor | None = None,
) -> np.ndarray:
    """Quantize a 2-D tensor chunk by chunk of rows.

    Args:
        tensor: ``(rows, cols)`` weights in any float dtype, on any device.
        block_size: the type's block length; ``cols`` must be a multiple of it.
        quantize_blocks: ``(n_blocks, block_size)`` float32 -> ``(n_blocks, type_size)`` uint8; called
            with a second argument, the blocks' per-weight importances, when ``importance`` is given.
        device: where to compute (default: :func:`compute_device`).
        importance: ``(cols,)`` importance of each input column (an importance-matrix entry).

    Returns:
        ``(rows, cols // block_size * type_size)`` uint8 array.
    """
    rows, cols = tensor.shape
    if cols % block_size:
        raise ValueError(f"row length {cols} is not a multiple of the block size {block_size}")
    device = device or compute_device()
    chunk_elements = CHUNK_ELEMENTS_CUDA if device.type == "cuda" else CHUNK_ELEMENTS_CPU
    rows_per_chunk = max(1, chunk_elements // cols)

    if importance is not None:
        importance = importance.to(device=device, dtype=torch.float32).reshape(1, cols)

    def run(start: int) -> np.ndarray:
        chunk = tensor[start : start + rows_per_chunk].to(device=device, dtype=torch.float32)
        if importance is None:
            blocks = quantize_blocks(chunk.reshape(-1, block_size))  # (n * cols / block_size, type_size)
        else:
            weights = importance.expand(chunk.shape[0], cols).reshape(-1, block_size)
            blocks = quantize_blocks(chunk.reshape(-1, block_size), weights)
        return blocks.reshape(chunk.shape[0], -1).cpu().numpy()

    starts = range(0, rows, rows_per_chunk)
    if device.type == "cuda" or len(starts) == 1:
        parts = [run(start) for start in starts]
    else:
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            with ThreadPoolExecutor(max_workers=min(len(starts), os.cpu_count() or 1)) as pool:
                parts = list(pool.map(run, starts))
        finally:
            torch.set_num_threads(threads)
    return np.concatenate(parts, axis=0) if len(parts) > 1 else parts[0]
