"""Which GGML type each tensor gets for a quantization choice (``q8_0``, ``q4_k_m``, ``q3_k_s``, ...).

The mixes follow llama.cpp's ``llama-quantize`` (its ``llama_tensor_get_type``) for dense models:

* most matrices at the choice's base type; vectors, norms and non-weight tensors stay F32;
* ``output.weight`` (or ``token_embd.weight`` when the two are tied) at Q6_K, except for ``q8_0``
  (Q8_0), and at Q8_0 when its rows do not fit the base type's blocks;
* per category and layer, a higher type for the ``_S``/``_M``/``_L`` mixes, as listed in
  :func:`tensor_type`; ``attn_v`` also depends on grouped-query attention (``n_gqa >= 4``) and some
  choices change with an importance matrix.

A matrix whose rows are not a multiple of its type's block falls back as llama.cpp does (IQ4_XS ->
IQ4_NL, Q2_K/Q3_K -> Q4_0, Q4_K -> Q5_0, Q5_K -> Q5_1, Q6_K -> Q8_0), then to F16. The rules
llama.cpp keeps for mixture-of-experts, Falcon and 70B models are not applied.
"""

from __future__ import annotations

import re
from typing import NamedTuple

from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as T
from gguf import LlamaFileType as F

from ftengine.core.errors import ExportError


class Mix(NamedTuple):
    """A quantization choice: base tensor type, the ``general.file_type`` llama.cpp reports, and the
    average bits per weight of a typical model (for disk-space estimates)."""

    base: T
    file_type: F
    bits: float


QUANTIZATIONS: dict[str, Mix] = {
    "f32": Mix(T.F32, F.ALL_F32, 32.0),
    "f16": Mix(T.F16, F.MOSTLY_F16, 16.0),
    "bf16": Mix(T.BF16, F.MOSTLY_BF16, 16.0),
    "q8_0": Mix(T.Q8_0, F.MOSTLY_Q8_0, 8.5),
    "q6_k": Mix(T.Q6_K, F.MOSTLY_Q6_K, 6.6),
    "q5_k_m": Mix(T.Q5_K, F.MOSTLY_Q5_K_M, 5.7),
    "q5_k_s": Mix(T.Q5_K, F.MOSTLY_Q5_K_S, 5.6),
    "q5_1": Mix(T.Q5_1, F.MOSTLY_Q5_1, 6.1),
    "q5_0": Mix(T.Q5_0, F.MOSTLY_Q5_0, 5.6),
    "q4_k_m": Mix(T.Q4_K, F.MOSTLY_Q4_K_M, 4.9),
    "q4_k_s": Mix(T.Q4_K, F.MOSTLY_Q4_K_S, 4.6),
    "q4_1": Mix(T.Q4_1, F.MOSTLY_Q4_1, 5.1),
    "q4_0": Mix(T.Q4_0, F.MOSTLY_Q4_0, 4.6),
    "iq4_nl": Mix(T.IQ4_NL, F.MOSTLY_IQ4_NL, 4.6),
    "iq4_xs": Mix(T.IQ4_XS, F.MOSTLY_IQ4_XS, 4.4),
    "q3_k_l": Mix(T.Q3_K, F.MOSTLY_Q3_K_L, 4.3),
    "q3_k_m": Mix(T.Q3_K, F.MOSTLY_Q3_K_M, 3.9),
    "q3_k_s": Mix(T.Q3_K, F.MOSTLY_Q3_K_S, 3.5),
    "q2_k": Mix(T.Q2_K, F.MOSTLY_Q2_K, 3.4),
    "q2_k_s": Mix(T.Q2_K, F.MOSTLY_Q2_K_S, 3.2),
}
"""Quantization choice (llama.cpp's names, lower case) -> its :class:`Mix`."""

ALIASES: dict[str, str] = {
    "not_quantized": "f16",
    "fast_quantized": "q8_0",
    "quantized": "q4_k_m",
    "q3_k": "q3_k_m",
    "q4_k": "q4_k_m",
    "q5_k": "q5_k_m",
}
"""Other accepted names: Unsloth's three presets and llama-quantize's short names of the ``_M`` mixes."""

_FALLBACK = {T.IQ4_XS: T.IQ4_NL, T.Q2_K: T.Q4_0, T.Q3_K: T.Q4_0, T.Q4_K: T.Q5_0, T.Q5_K: T.Q5_1, T.Q6_K: T.Q8_0}
_LAYER = re.compile(r"^blk\.(\d+)\.")
_CATEGORIES = (("attn_qkv.weight", "attn_v"), ("attn_kv_b.weight", "attn_v"), ("attn_v.weight", "attn_v"),
               ("attn_k.weight", "attn_k"), ("attn_q.weight", "attn_q"), ("attn_output.weight", "attn_output"),
               ("ffn_up", "ffn_up"), ("ffn_gate", "ffn_gate"), ("ffn_down", "ffn_down"))


def check_quantization(quantization: str) -> str:
    """The canonical choice for a name or alias (any case); :class:`ExportError` naming the choices otherwise."""
    name = quantization.lower()
    name = ALIASES.get(name, name)
    if name not in QUANTIZATIONS:
        raise ExportError(
            f"unknown GGUF quantization {quantization!r}; choose one of: {', '.join(QUANTIZATIONS)} "
            f"(or {', '.join(ALIASES)})"
        )
    return name


def use_more_bits(i_layer: int, n_layers: int) -> bool:
    """llama.cpp's choice of layers whose ``attn_v`` / ``ffn_down`` get more bits in the ``_M`` mixes."""
    return i_layer < n_layers // 8 or i_layer >= 7 * n_layers // 8 or (i_layer - n_layers // 8) % 3 == 2


def _fits(qtype: T, row: int) -> bool:
    return row % GGML_QUANT_SIZES[qtype][0] == 0


def _quantizable(name: str, shape: tuple[int, ...]) -> bool:
    return len(shape) >= 2 and name.endswith("weight") and "_norm.weight" not in name


def _category(name: str) -> str:
    for pattern, category in _CATEGORIES:
        if pattern in name:
            return category
    return "other"


def _attn_v(q: str, i: int, n: int, n_gqa: int) -> T | None:
    if q == "q2_k":
        return T.Q4_K if n_gqa >= 4 else T.Q3_K
    if q == "q2_k_s" and n_gqa >= 4:
        return T.Q4_K
    if q == "q3_k_m":
        return T.Q5_K if i < 2 else T.Q4_K
    if q == "q3_k_l":
        return T.Q5_K
    if q in ("iq4_nl", "iq4_xs") and n_gqa >= 4:
        return T.Q5_K
    if q in ("q4_k_m", "q5_k_m") and use_more_bits(i, n):
        return T.Q6_K
    if q == "q4_k_s" and i < 4:
        return T.Q5_K
    return None


def _ffn_down(q: str, i: int, n: int, imatrix: bool) -> T | None:
    if q == "q2_k":
        return T.Q3_K
    if q == "q2_k_s":
        return T.Q4_K if i < n // 8 else None
    if q == "q3_k_m":
        return T.Q5_K if i < n // 16 else T.Q4_K
    if q == "q3_k_l":
        return T.Q5_K
    if q == "q4_k_m":
        return T.Q6_K if use_more_bits(i, n) else None
    if i < n // 8 and q in ("iq4_nl", "iq4_xs") and not imatrix:
        return T.Q5_K
    if q == "q5_k_m":
        return T.Q6_K if use_more_bits(i, n) else None
    if q == "q4_k_s":
        return T.Q5_K if i < n // 8 else None
    if q in ("q4_0", "q5_0") and imatrix and i < n // 8:
        return T.Q4_1 if q == "q4_0" else T.Q5_1
    return None


_ATTN_OUTPUT = {"q2_k": T.Q3_K, "q3_k_m": T.Q4_K, "q3_k_l": T.Q5_K}


def tensor_type(
    name: str,
    shape: tuple[int, ...],
    quantization: str,
    n_layers: int,
    tied_embeddings: bool,
    n_gqa: int = 1,
    imatrix: bool = False,
) -> T:
    """The GGML type of one tensor.

    The per-category raises, by choice (``i`` the layer, ``n`` the layer count):

    * ``attn_v`` (and fused ``attn_qkv``): q2_k Q3_K (Q4_K if ``n_gqa >= 4``), q2_k_s Q4_K if
      ``n_gqa >= 4``, q3_k_m Q5_K for ``i < 2`` else Q4_K, q3_k_l Q5_K, iq4_nl/iq4_xs Q5_K if
      ``n_gqa >= 4``, q4_k_m/q5_k_m Q6_K where :func:`use_more_bits`, q4_k_s Q5_K for ``i < 4``;
    * ``ffn_down``: q2_k Q3_K, q2_k_s Q4_K for ``i < n/8``, q3_k_m Q5_K for ``i < n/16`` else Q4_K,
      q3_k_l Q5_K, q4_k_m/q5_k_m Q6_K where :func:`use_more_bits`, iq4_nl/iq4_xs Q5_K for
      ``i < n/8`` without an imatrix, q4_k_s Q5_K for ``i < n/8``, q4_0/q5_0 with an imatrix Q4_1/Q5_1
      for ``i < n/8``;
    * ``attn_output``: q2_k Q3_K, q3_k_m Q4_K, q3_k_l Q5_K.

    Args:
        name: the GGUF tensor name (``blk.3.attn_v.weight``).
        shape: its torch shape (the last dimension is the GGUF row).
        quantization: a key of :data:`QUANTIZATIONS`.
        n_layers: the model's block count.
        tied_embeddings: the file has no ``output.weight``: ``token_embd`` doubles as the output.
        n_gqa: attention heads per key/value head.
        imatrix: the tensors are quantized with an importance matrix.

    Returns:
        The type to write the tensor as.
    """
    base = QUANTIZATIONS[quantization].base
    if not _quantizable(name, shape) or base == T.F32:
        return T.F32
    row = shape[-1]
    if base in (T.F16, T.BF16):
        return base
    if base == T.Q8_0:  # as convert_hf_to_gguf's q8_0: every matrix, F16 where rows do not fit
        return base if _fits(base, row) else T.F16
    match = _LAYER.match(name)
    layer = int(match.group(1)) if match else 0
    category = _category(name)
    new: T | None = None
    if name == "output.weight" or (tied_embeddings and name == "token_embd.weight"):
        new = T.Q6_K if _fits(base, row) else T.Q8_0
    elif category == "attn_v":
        new = _attn_v(quantization, layer, n_layers, n_gqa)
    elif category == "ffn_down":
        new = _ffn_down(quantization, layer, n_layers, imatrix)
    elif category == "attn_output":
        new = _ATTN_OUTPUT.get(quantization)
    new = new or base
    if not _fits(new, row):
        new = _FALLBACK.get(new, T.F16)
        if not _fits(new, row):
            new = T.F16
    return new
