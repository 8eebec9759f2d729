"""Tensor quantizers for GGUF: one module per family, one entry point, :func:`quantize`.

All are ours (torch, on the GPU when there is one): F32/F16/BF16; the legacy block types Q8_0,
Q4_0, Q4_1, Q5_0, Q5_1 (byte-identical to ggml's reference); the K-quants Q2_K to Q6_K; IQ4_NL and
IQ4_XS. Every type but the float ones and Q8_0 takes an importance matrix entry (per input column)
and weighs its scale search with it, as llama.cpp does (the legacy 4- and 5-bit types then leave the
reference rounding for a weighted search, ``legacy_weighted.py``).
"""

from __future__ import annotations

from functools import partial

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType

from ftengine.plugins.exporters.gguf.quants import floats
from ftengine.plugins.exporters.gguf.quants import iq4
from ftengine.plugins.exporters.gguf.quants import k_low
from ftengine.plugins.exporters.gguf.quants import k_quants
from ftengine.plugins.exporters.gguf.quants import legacy
from ftengine.plugins.exporters.gguf.quants import legacy_weighted
from ftengine.plugins.exporters.gguf.quants import q4_0
from ftengine.plugins.exporters.gguf.quants import q8_0
from ftengine.plugins.exporters.gguf.quants.common import by_row_chunks

T = GGMLQuantizationType
_BLOCK_QUANTIZERS = {
    T.Q8_0: q8_0.quantize_blocks,
    T.Q4_0: q4_0.quantize_blocks,
    T.Q4_1: legacy.quantize_q4_1,
    T.Q5_0: legacy.quantize_q5_0,
    T.Q5_1: legacy.quantize_q5_1,
}
_WEIGHTED_QUANTIZERS = {
    T.Q2_K: k_low.quantize_q2_k,
    T.Q3_K: k_low.quantize_q3_k,
    T.Q4_K: k_quants.quantize_q4_k,
    T.Q5_K: k_quants.quantize_q5_k,
    T.Q6_K: k_quants.quantize_q6_k,
    T.IQ4_NL: iq4.quantize_iq4_nl,
    T.IQ4_XS: iq4.quantize_iq4_xs,
}
_LEGACY_WEIGHTED = {
    T.Q4_0: legacy_weighted.quantize_q4_0,
    T.Q4_1: legacy_weighted.quantize_q4_1,
    T.Q5_0: legacy_weighted.quantize_q5_0,
    T.Q5_1: legacy_weighted.quantize_q5_1,
}
_FLOATS = {T.F32: "F32", T.F16: "F16", T.BF16: "BF16"}

SUPPORTED = tuple(_FLOATS) + tuple(_BLOCK_QUANTIZERS) + tuple(_WEIGHTED_QUANTIZERS)
"""Every GGML type :func:`quantize` writes."""

USES_IMPORTANCE = tuple(_WEIGHTED_QUANTIZERS) + tuple(_LEGACY_WEIGHTED)
"""The types whose quantizers use an importance matrix."""


def block_size(qtype: GGMLQuantizationType) -> int:
    """Weights per block of ``qtype`` (1 for the float types)."""
    return GGML_QUANT_SIZES[qtype][0]


def quantize(
    tensor: torch.Tensor,
    qtype: GGMLQuantizationType,
    device: torch.device | None = None,
    importance: torch.Tensor | None = None,
) -> np.ndarray:
    """A tensor's GGUF bytes as ``qtype``.

    Args:
        tensor: weights, any float dtype, any device; quantized types need at least 1 dimension and a
            last dimension that is a multiple of the type's block size.
        qtype: one of :data:`SUPPORTED`.
        device: where our quantizers compute (default: the GPU when there is one, else the CPU).
        importance: ``(tensor.shape[-1],)`` mean squared activation of each input column (an
            importance-matrix entry); used by the types in :data:`USES_IMPORTANCE`, ignored by the others.

    Returns:
        uint8 array ``(*tensor.shape[:-1], row_bytes)``, as ``GGUFWriter.add_tensor_info`` with
        ``raw_dtype=qtype`` expects.

    Raises:
        ValueError: ``qtype`` is not supported, the row length does not fit its blocks, or the
            importance does not have one entry per column.
    """
    if qtype in _FLOATS:
        return floats.to_bytes(tensor, _FLOATS[qtype])
    if qtype not in SUPPORTED:
        raise ValueError(f"cannot quantize to {qtype.name}; supported: {', '.join(t.name for t in SUPPORTED)}")
    shape = tuple(tensor.shape)
    rows2d = tensor.detach().reshape(-1, shape[-1])
    if importance is not None and qtype in USES_IMPORTANCE and tuple(importance.shape) != (shape[-1],):
        raise ValueError(f"importance has shape {tuple(importance.shape)}; expected ({shape[-1]},)")
    if qtype in _WEIGHTED_QUANTIZERS:
        data = by_row_chunks(rows2d, block_size(qtype), _WEIGHTED_QUANTIZERS[qtype], device, importance)
    elif qtype in _LEGACY_WEIGHTED and importance is not None:  # the row's mean square enters the weights
        weighted = partial(_LEGACY_WEIGHTED[qtype], row_length=shape[-1])
        data = by_row_chunks(rows2d, block_size(qtype), weighted, device, importance)
    else:
        data = by_row_chunks(rows2d, block_size(qtype), _BLOCK_QUANTIZERS[qtype], device)
    return data.reshape(*shape[:-1], data.shape[-1])
