"""Which attention implementation (Hugging Face's ``attn_implementation``) a model trains with."""

from __future__ import annotations

from typing import Any

import torch

from ftengine.core.errors import ConfigError
from ftengine.engine.settings import settings_of

ATTENTION_IMPLEMENTATIONS = ("sdpa", "flex_attention", "eager")
FLEX_NEEDS_CUDA = ("model.attn_implementation: flex_attention trains on a CUDA GPU only (FlexAttention has no "
                   "backward on the CPU); use sdpa, or auto (sdpa here, flex_attention for packed rows on a GPU)")


def resolve_attn_implementation(requested: str, packing: bool,
                                supported: tuple[str, ...] = ATTENTION_IMPLEMENTATIONS) -> str:
    """The attention implementation (Hugging Face's ``attn_implementation``) a model is loaded with.

    ``auto`` is ``flex_attention`` for packed rows on a CUDA GPU: transformers turns the restarting
    position ids into a FlexAttention block mask with one causal block per sample, and the kernel skips
    the blocks that cross a sample boundary (sdpa computes the whole T x T under a dense block-diagonal
    mask). Otherwise ``auto`` is ``sdpa``, or ``eager`` for a model class without sdpa (Gemma 2).
    An explicit choice is returned as it is.

    Args:
        requested: ``model.attn_implementation``: ``auto``, ``sdpa``, ``flex_attention`` or ``eager``.
        packing: whether the training rows are packed (``data.packing``).
        supported: what the model class implements (:func:`supported_attn_implementations`).
    """
    if requested != "auto":
        return requested
    if packing and "flex_attention" in supported and torch.cuda.is_available():
        return "flex_attention"
    return "sdpa" if "sdpa" in supported else "eager"


def supported_attn_implementations(hf_config: Any) -> tuple[str, ...]:
    """The attention implementations of the class transformers builds for ``hf_config``: eager, and sdpa
    and flex_attention where the class declares them. A class transformers does not map (remote code) is
    taken to have sdpa."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    if type(hf_config) not in MODEL_FOR_CAUSAL_LM_MAPPING:
        return ("sdpa", "eager")
    model_class = MODEL_FOR_CAUSAL_LM_MAPPING[type(hf_config)]
    flags = {"sdpa": model_class._supports_sdpa, "flex_attention": model_class._supports_flex_attn, "eager": True}
    return tuple(name for name in ATTENTION_IMPLEMENTATIONS if flags[name])


def choose_attn_implementation(requested: str, packing: bool, hf_config: Any, training: bool = False) -> str:
    """:func:`resolve_attn_implementation` for this model, checked.

    Raises:
        ConfigError: the model class lacks the requested implementation, or ``training`` with
            flex_attention and no CUDA GPU (FlexAttention has no backward on the CPU).
    """
    supported = supported_attn_implementations(hf_config)
    chosen = resolve_attn_implementation(requested, packing, supported)
    if chosen not in supported:
        raise ConfigError(f"model.attn_implementation: {chosen!r} is not implemented by the model's transformers "
                          f"class ({hf_config.model_type}); use auto or one of: {', '.join(supported)}")
    if training and chosen == "flex_attention" and not torch.cuda.is_available():
        raise ConfigError(FLEX_NEEDS_CUDA)
    return chosen


def attention_for_rows(model: Any, packed: bool) -> str:
    """Python API, before training: a model loaded with ``attn_implementation="auto"`` (before the data
    was known) switches to what ``auto`` means for these rows; then the implementation is checked.

    Raises:
        ConfigError: flex_attention without a CUDA GPU.
    """
    current = model.config._attn_implementation
    if settings_of(model).attn_implementation == "auto":
        wanted = resolve_attn_implementation("auto", packed, supported_attn_implementations(model.config))
        if wanted != current:
            model.set_attn_implementation(wanted)
            current = wanted
    if current == "flex_attention" and not torch.cuda.is_available():
        raise ConfigError(FLEX_NEEDS_CUDA)
    return current


def attention_note(chosen: str, requested: str, packing: bool) -> str:
    """The run summary's line on attention."""
    how = {"flex_attention": "a FlexAttention document mask, blocks across samples skipped",
           "sdpa": "a dense block-diagonal mask over each row", "eager": "a dense block-diagonal mask over each row"}
    details = (["auto"] if requested == "auto" else []) + ([f"packed rows: {how[chosen]}"] if packing else [])
    return f"attention: {chosen}" + (f" ({'; '.join(details)})" if details else "")
