"""Tensor quantizers for GGUF: one module per family, one entry point, :func:`quantize`.

F32/F16/BF16, Q8_0, Q4_0 and the K-quants Q4_K/Q5_K/Q6_K are ours (torch, on the GPU when there is
one); Q5_0 and Q5_1, which only the K-quant mixes need as fallbacks for rows that are not a
multiple of 256, come from ``gguf.quants``.
"""

from __future__ import annotations

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType
from gguf import quants as gguf_quants

from ftengine.plugins.exporters.gguf.quants import floats
from ftengine.plugins.exporters.gguf.quants import k_quants
from ftengine.plugins.exporters.gguf.quants import q4_0
from ftengine.plugins.exporters.gguf.quants import q8_0
from ftengine.plugins.exporters.gguf.quants.common import by_row_chunks

_BLOCK_QUANTIZERS = {
    GGMLQuantizationType.Q8_0: q8_0.quantize_blocks,
    GGMLQuantizationType.Q4_0: q4_0.quantize_blocks,
    GGMLQuantizationType.Q4_K: k_quants.quantize_q4_k,
    GGMLQuantizationType.Q5_K: k_quants.quantize_q5_k,
    GGMLQuantizationType.Q6_K: k_quants.quantize_q6_k,
}
_FLOATS = {GGMLQuantizationType.F32: "F32", GGMLQuantizationType.F16: "F16", GGMLQuantizationType.BF16: "BF16"}
_FROM_GGUF = (GGMLQuantizationType.Q5_0, GGMLQuantizationType.Q5_1)

SUPPORTED = tuple(_FLOATS) + tuple(_BLOCK_QUANTIZERS) + _FROM_GGUF
"""Every GGML type :func:`quantize` writes."""


def block_size(qtype: GGMLQuantizationType) -> int:
    """Weights per block of ``qtype`` (1 for the float types)."""
    return GGML_QUANT_SIZES[qtype][0]


def quantize(tensor: torch.Tensor, qtype: GGMLQuantizationType, device: torch.device | None = None) -> np.ndarray:
    """A tensor's GGUF bytes as ``qtype``.

    Args:
        tensor: weights, any float dtype, any device; quantized types need at least 1 dimension and a
            last dimension that is a multiple of the type's block size.
        qtype: one of :data:`SUPPORTED`.
        device: where our quantizers compute (default: the GPU when there is one, else the CPU).

    Returns:
        uint8 array ``(*tensor.shape[:-1], row_bytes)``, as ``GGUFWriter.add_tensor_info`` with
        ``raw_dtype=qtype`` expects.

    Raises:
        ValueError: ``qtype`` is not supported or the row length does not fit its blocks.
    """
    if qtype in _FLOATS:
        return floats.to_bytes(tensor, _FLOATS[qtype])
    if qtype not in SUPPORTED:
        raise ValueError(f"cannot quantize to {qtype.name}; supported: {', '.join(t.name for t in SUPPORTED)}")
    shape = tuple(tensor.shape)
    rows2d = tensor.detach().reshape(-1, shape[-1])
    if qtype in _FROM_GGUF:
        data = gguf_quants.quantize(rows2d.to(device="cpu", dtype=torch.float32).numpy(), qtype)
    else:
        data = by_row_chunks(rows2d, block_size(qtype), _BLOCK_QUANTIZERS[qtype], device)
    return data.reshape(*shape[:-1], data.shape[-1])
