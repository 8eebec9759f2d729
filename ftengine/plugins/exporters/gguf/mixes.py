"""Which GGML type each tensor gets for a quantization choice (``q8_0``, ``q4_k_m``, ...).

The K-quant mixes follow llama.cpp's ``llama-quantize`` for dense models: most matrices at the
mix's base type; ``output.weight`` (or ``token_embd.weight`` when the two are tied) at Q6_K;
``attn_v`` and ``ffn_down`` (and a fused ``attn_qkv``) at Q6_K in the layers its ``use_more_bits`` rule picks (the
first and last eighth of the layers and every third one between). A matrix
whose rows are not a multiple of the type's block falls back as llama.cpp does (Q4_K -> Q5_0,
Q5_K -> Q5_1, Q6_K -> Q8_0, then F16). Vectors, norms and non-weight tensors stay F32.
"""

from __future__ import annotations

import re

from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as T
from gguf import LlamaFileType

from ftengine.core.errors import ExportError

QUANTIZATIONS: dict[str, tuple[T, LlamaFileType]] = {
    "f32": (T.F32, LlamaFileType.ALL_F32),
    "f16": (T.F16, LlamaFileType.MOSTLY_F16),
    "bf16": (T.BF16, LlamaFileType.MOSTLY_BF16),
    "q8_0": (T.Q8_0, LlamaFileType.MOSTLY_Q8_0),
    "q4_0": (T.Q4_0, LlamaFileType.MOSTLY_Q4_0),
    "q4_k_m": (T.Q4_K, LlamaFileType.MOSTLY_Q4_K_M),
    "q5_k_m": (T.Q5_K, LlamaFileType.MOSTLY_Q5_K_M),
    "q6_k": (T.Q6_K, LlamaFileType.MOSTLY_Q6_K),
}
"""Quantization choice -> (base tensor type, the ``general.file_type`` llama.cpp reports)."""

_FALLBACK = {T.Q4_K: T.Q5_0, T.Q5_K: T.Q5_1, T.Q6_K: T.Q8_0}
_LAYER = re.compile(r"^blk\.(\d+)\.")


def check_quantization(quantization: str) -> str:
    """The lower-cased choice; :class:`ExportError` naming the supported choices otherwise."""
    name = quantization.lower()
    if name not in QUANTIZATIONS:
        raise ExportError(f"unknown GGUF quantization {quantization!r}; choose one of: {', '.join(QUANTIZATIONS)}")
    return name


def use_more_bits(i_layer: int, n_layers: int) -> bool:
    """llama.cpp's choice of layers whose ``attn_v`` / ``ffn_down`` get more bits in the ``_M`` mixes."""
    return i_layer < n_layers // 8 or i_layer >= 7 * n_layers // 8 or (i_layer - n_layers // 8) % 3 == 2


def _fits(qtype: T, row: int) -> bool:
    return row % GGML_QUANT_SIZES[qtype][0] == 0


def _quantizable(name: str, shape: tuple[int, ...]) -> bool:
    return len(shape) >= 2 and name.endswith("weight") and "_norm.weight" not in name


def tensor_type(name: str, shape: tuple[int, ...], quantization: str, n_layers: int, tied_embeddings: bool) -> T:
    """The GGML type of one tensor.

    Args:
        name: the GGUF tensor name (``blk.3.attn_v.weight``).
        shape: its torch shape (the last dimension is the GGUF row).
        quantization: a key of :data:`QUANTIZATIONS`.
        n_layers: the model's block count.
        tied_embeddings: the file has no ``output.weight``: ``token_embd`` doubles as the output.

    Returns:
        The type to write the tensor as.
    """
    base, _ = QUANTIZATIONS[quantization]
    if not _quantizable(name, shape) or base == T.F32:
        return T.F32
    row = shape[-1]
    if base in (T.F16, T.BF16):
        return base
    if base == T.Q8_0:  # as convert_hf_to_gguf's q8_0: every matrix, F16 where rows do not fit
        return base if _fits(base, row) else T.F16
    new = base
    is_output = name == "output.weight" or (tied_embeddings and name == "token_embd.weight")
    match = _LAYER.match(name)
    layer = int(match.group(1)) if match else 0
    if is_output:
        new = T.Q6_K if _fits(base, row) else T.Q8_0
    elif quantization in ("q4_k_m", "q5_k_m"):
        sensitive = "attn_v.weight" in name or "attn_qkv.weight" in name or "ffn_down" in name
        if sensitive and use_more_bits(layer, n_layers):
            new = T.Q6_K
    if not _fits(new, row):
        new = _FALLBACK.get(new, new)
        if not _fits(new, row):
            new = T.F16
    return new
