"""GGUF helpers shared by the architecture adapters: tensor names, tensor layout, metadata.

Names come from gguf-py's own ``TensorNameMap`` (the table llama.cpp's converter uses), so a
family only states its llama.cpp architecture and which Hugging Face tensors it drops. Layouts
follow ``convert_hf_to_gguf.py``: Llama-style q/k rows are regrouped from Hugging Face's
rotate-half order to llama.cpp's interleaved rotary order, and Gemma norms are stored as
``1 + w``.
"""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

_LAYER = re.compile(r"\.layers\.(\d+)\.")
_BLOCK0 = "blk.0."


def _arch(arch: str) -> Any:
    """gguf's ``MODEL_ARCH`` member of a llama.cpp architecture name."""
    import gguf  # only exports need it

    for key, value in gguf.MODEL_ARCH_NAMES.items():
        if value == arch:
            return key
    raise ValueError(f"gguf does not know the llama.cpp architecture {arch!r}")


@functools.cache
def _name_map(arch: str) -> Any:
    """The one-block ``gguf.TensorNameMap`` of a llama.cpp architecture; other blocks map through block 0."""
    import gguf

    return gguf.get_tensor_name_map(_arch(arch), 1)


def has_tensor(arch: str, name: str) -> bool:
    """Whether llama.cpp's architecture ``arch`` reads a tensor named ``name`` (e.g. ``rope_freqs``)."""
    import gguf

    return any(gguf.TENSOR_NAMES[t] == name for t in gguf.MODEL_TENSORS[_arch(arch)])


def tensor_name(
    arch: str, hf_name: str, skip: tuple[str, ...] = (), renames: tuple[tuple[str, str], ...] = ()
) -> str | None:
    """llama.cpp's name for a Hugging Face state-dict name.

    Args:
        arch: llama.cpp architecture (``llama``, ``qwen2``, ``gemma2``, ...).
        hf_name: e.g. ``model.layers.3.self_attn.q_proj.weight``.
        skip: regular expressions of names that are not exported (searched, not anchored).
        renames: ``(prefix, replacement)`` pairs applied first (e.g. a multimodal wrapper's
            ``model.language_model.`` -> ``model.``); the first matching prefix wins.

    Returns:
        e.g. ``blk.3.attn_q.weight``; ``None`` for skipped names and rotary ``inv_freq`` buffers.

    Raises:
        KeyError: a name neither skipped nor known to llama.cpp's map for ``arch``.
    """
    if hf_name.endswith("rotary_emb.inv_freq") or any(re.search(p, hf_name) for p in skip):
        return None
    name = hf_name
    for prefix, replacement in renames:
        if name.startswith(prefix):
            name = replacement + name[len(prefix):]
            break
    match = _LAYER.search(name)
    block = None
    if match:
        block = match.group(1)
        name = name[: match.start()] + ".layers.0." + name[match.end():]
    mapped = _name_map(arch).get_name(name, try_suffixes=(".weight", ".bias"))
    if mapped is None:
        raise KeyError(f"no GGUF name for tensor {hf_name!r} in llama.cpp architecture {arch!r}")
    if block is not None and mapped.startswith(_BLOCK0):
        mapped = f"blk.{block}." + mapped[len(_BLOCK0):]
    return mapped


def split_fused_experts(hf_name: str, tensor: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
    """``experts.gate_up_proj`` ``(E, 2I, H)`` as llama.cpp's two stacks, named as its converter reads them.

    transformers 5 fuses each block's expert gate and up projections (gate rows first); llama.cpp
    keeps ``ffn_gate_exps`` and ``ffn_up_exps`` apart, each ``(E, I, H)`` in torch order.
    ``experts.down_proj`` becomes ``experts.down_proj.weight``. Other tensors pass unchanged.
    """
    if hf_name.endswith(".experts.gate_up_proj"):
        stem = hf_name[: -len("gate_up_proj")]
        gate, up = tensor.chunk(2, dim=1)
        return [(f"{stem}gate_proj.weight", gate), (f"{stem}up_proj.weight", up)]
    if hf_name.endswith(".experts.down_proj"):
        return [(f"{hf_name}.weight", tensor)]
    return [(hf_name, tensor)]


def permute_rotary_rows(weight: torch.Tensor, n_head: int) -> torch.Tensor:
    """Regroup q/k projection rows from rotate-half order to llama.cpp's interleaved pairs.

    Within each head, Hugging Face keeps the two rotated halves as rows ``[0, D/2)`` and
    ``[D/2, D)``; llama.cpp rotates adjacent pairs ``(2i, 2i+1)``. Row ``h*D + 2i + j`` of the
    result is row ``h*D + j*D/2 + i`` of the input (works for a bias vector too).

    Args:
        weight: ``(n_head * D, ...)``.
        n_head: heads of this projection (key/value heads for ``k_proj``).
    """
    rows = weight.shape[0]
    return weight.reshape(n_head, 2, rows // n_head // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def rope_metadata(config: Any) -> dict[str, Any]:
    """``rope.*`` keys from a Hugging Face config: base frequency, rotary dimensions and scaling.

    ``linear`` and ``yarn`` scaling become ``rope.scaling.*`` keys (YaRN's original context length,
    its cos/sin scale when not the default, and, when set, ``beta_fast`` / ``beta_slow``, which
    llama.cpp as of llama-cpp-python 0.3.36 does not read yet). Llama 3's frequency-dependent scaling has no
    key: llama.cpp reads it from the ``rope_freqs.weight`` tensor (:func:`llama3_rope_factors`).
    LongRoPE's keys and tensors belong to the Phi-3 adapter. ``dynamic`` (NTK) scaling has no
    llama.cpp form: it changes nothing up to the original context, and the file runs unscaled.
    """
    params = rope_parameters(config)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    partial = params.get("partial_rotary_factor", getattr(config, "partial_rotary_factor", None)) or 1.0
    meta: dict[str, Any] = {"rope.dimension_count": int(head_dim * partial)}
    theta = params.get("rope_theta", getattr(config, "rope_theta", None))
    if theta is not None:
        meta["rope.freq_base"] = float(theta)
    kind = params.get("rope_type", params.get("type"))
    if kind in ("linear", "yarn"):
        meta["rope.scaling.type"] = kind
        meta["rope.scaling.factor"] = float(params["factor"])
    if kind == "yarn":
        original = params.get("original_max_position_embeddings")
        if original is not None:
            meta["rope.scaling.original_context_length"] = int(original)
        meta.update(_yarn_attention(params))
        for hf_key, gguf_key in (("beta_fast", "yarn_beta_fast"), ("beta_slow", "yarn_beta_slow")):
            if params.get(hf_key) is not None:
                meta[f"rope.scaling.{gguf_key}"] = float(params[hf_key])
    return meta


def _yarn_attention(params: dict[str, Any]) -> dict[str, Any]:
    """``rope.scaling.attn_factor`` when YaRN's cos/sin scale is not the default ``0.1 ln(s) + 1``.

    Hugging Face scales cos/sin by ``attention_factor``, or by ``m(s, mscale) / m(s, mscale_all_dim)``
    with ``m(s, k) = 0.1 k ln(s) + 1`` when both are set, else by ``m(s, 1)``; llama.cpp multiplies its
    own ``m(s, 1)`` by ``attn_factor``, so the key holds the ratio.
    """
    factor = float(params["factor"])

    def mscale(k: float) -> float:
        return 0.1 * k * math.log(factor) + 1.0 if factor > 1 else 1.0

    attention = params.get("attention_factor")
    if attention is None and params.get("mscale") and params.get("mscale_all_dim"):
        attention = mscale(params["mscale"]) / mscale(params["mscale_all_dim"])
    if attention is None:
        return {}
    return {"rope.scaling.attn_factor": float(attention) / mscale(1.0)}


def rope_parameters(config: Any) -> dict[str, Any]:
    """The rope settings whichever attribute this transformers version keeps them in."""
    params = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    if isinstance(params, dict) and "full_attention" in params:  # per-layer-type (Gemma 3)
        params = params["full_attention"]
    return dict(params) if isinstance(params, dict) else {}


def llama3_rope_factors(config: Any) -> torch.Tensor | None:
    """The per-frequency divisors of Llama 3.1's rope scaling (``rope_freqs.weight``), else ``None``.

    With wavelength ``w = 2*pi / f`` of each rotary frequency ``f``: wavelengths shorter than
    ``L/high_freq_factor`` keep ``f`` (divisor 1), longer than ``L/low_freq_factor`` are divided by
    ``factor``, and in between the divisor blends ``1/((1-s)/factor + s)`` with
    ``s = (L/w - low) / (high - low)``; ``L`` is the original context length.
    """
    params = rope_parameters(config)
    if params.get("rope_type", params.get("type")) != "llama3":
        return None
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    base = float(params.get("rope_theta", getattr(config, "rope_theta", 10000.0)))
    factor = float(params["factor"])
    low = float(params.get("low_freq_factor", 1.0))
    high = float(params.get("high_freq_factor", 4.0))
    old_context = float(params["original_max_position_embeddings"])
    freqs = 1.0 / base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    wavelen = 2 * torch.pi / freqs
    smooth = (old_context / wavelen - low) / (high - low)
    blended = 1.0 / ((1 - smooth) / factor + smooth)
    divisor = torch.where(wavelen < old_context / high, torch.ones_like(freqs), blended)
    return torch.where(wavelen > old_context / low, torch.full_like(freqs, factor), divisor)


def head_lengths(config: Any) -> dict[str, Any]:
    """``attention.key_length`` / ``value_length`` when ``head_dim`` is set explicitly (as llama.cpp's converter)."""
    head_dim = getattr(config, "head_dim", None)
    if head_dim is None:
        return {}
    return {"attention.key_length": int(head_dim), "attention.value_length": int(head_dim)}


def vocab_and_head_lengths(config: Any) -> dict[str, Any]:
    """The vocabulary size and explicit head lengths (llama.cpp's ``llama`` architecture keys beyond rope)."""
    return {"vocab_size": int(config.vocab_size), **head_lengths(config)}


def _text(config: Any) -> Any:
    """The language model's config (a multimodal config keeps it as ``text_config``)."""
    return getattr(config, "text_config", None) or config


@dataclass(frozen=True)
class GGUFLayout:
    """A :class:`ftengine.core.types.GGUFSupport` described by data, for decoder-only families.

    Attributes:
        architecture: llama.cpp's architecture name.
        permute_qk: regroup q/k rows to llama.cpp's rotary order (Llama, Mistral).
        norm_shift: added to every ``*norm.weight`` on export (Gemma stores ``1 + w``).
        skip: regular expressions of Hugging Face tensors not exported.
        renames: ``(prefix, replacement)`` pairs applied before name mapping (multimodal wrappers).
        extra_metadata: the family's own keys from the (text) config, beyond :func:`rope_metadata`.
        family_tensors: the family's own tensors computed from the (text) config (Phi-3's LongRoPE
            factors), beyond Llama 3 scaling's ``rope_freqs.weight``.
        mmproj: a vision-language family's vision tower and projector as llama.cpp's mmproj file
            (:class:`ftengine.plugins.models._mmproj.MmprojLayout`); ``None``: text only.

    .. versionadded:: 0.1
    """

    architecture: str
    permute_qk: bool = False
    norm_shift: float = 0.0
    skip: tuple[str, ...] = ()
    renames: tuple[tuple[str, str], ...] = ()
    extra_metadata: Callable[[Any], dict[str, Any]] | None = None
    family_tensors: Callable[[Any], dict[str, torch.Tensor]] | None = None
    mmproj: Any = None

    def tensor_name(self, hf_name: str) -> str | None:
        """llama.cpp's name for a Hugging Face tensor name (``None``: not exported)."""
        return tensor_name(self.architecture, hf_name, self.skip, self.renames)

    def tensor(self, hf_name: str, tensor: torch.Tensor, config: Any) -> torch.Tensor:
        """The tensor in llama.cpp's layout: q/k rows regrouped (Llama), norms shifted (Gemma)."""
        text = _text(config)
        if self.permute_qk and hf_name.endswith(("q_proj.weight", "q_proj.bias")):
            return permute_rotary_rows(tensor, text.num_attention_heads)
        if self.permute_qk and hf_name.endswith(("k_proj.weight", "k_proj.bias")):
            return permute_rotary_rows(tensor, text.num_key_value_heads or text.num_attention_heads)
        if self.norm_shift and hf_name.endswith("norm.weight"):
            return tensor + self.norm_shift
        return tensor

    def metadata(self, config: Any) -> dict[str, Any]:
        """Architecture keys without the ``{arch}.`` prefix: rope settings and the family's own."""
        text = _text(config)
        meta = rope_metadata(text)
        if self.extra_metadata is not None:
            meta.update(self.extra_metadata(text))
        return meta

    def split_tensor(self, hf_name: str, tensor: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
        """The Hugging Face tensors llama.cpp stores apart: fused experts' ``gate_up_proj`` -> gate and up."""
        return split_fused_experts(hf_name, tensor)

    def extra_tensors(self, config: Any) -> dict[str, torch.Tensor]:
        """Tensors llama.cpp needs that have no Hugging Face counterpart: Llama 3 scaling's
        ``rope_freqs.weight`` (for any architecture llama.cpp reads it in) and the family's own."""
        text = _text(config)
        tensors = {}
        factors = llama3_rope_factors(text)
        if factors is not None and has_tensor(self.architecture, "rope_freqs"):
            tensors["rope_freqs.weight"] = factors
        if self.family_tensors is not None:
            tensors.update(self.family_tensors(text))
        return tensors
