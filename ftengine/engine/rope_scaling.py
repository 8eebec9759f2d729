"""``model.rope_scaling``: put a RoPE scaling on a Hugging Face config before the model is built.

transformers computes the rotary cos/sin from the config (``rope_parameters`` from 5.0,
``rope_scaling`` before), and the patched attention consumes them as they come, so setting the
config is the whole of it. The context arithmetic follows transformers: YaRN, Llama 3 and LongRoPE
read ``original_max_position_embeddings`` (default: the model's ``max_position_embeddings``) and
expect ``max_position_embeddings = original x factor``; linear scaling stretches the context the
same way; dynamic NTK keeps ``max_position_embeddings``, the length past which it grows the base.
"""

from __future__ import annotations

from typing import Any

from ftengine.core.errors import ConfigError

EXTENDS_CONTEXT = ("linear", "yarn", "llama3", "longrope")
NEEDS_ORIGINAL = ("yarn", "llama3", "longrope")
LLAMA3_DEFAULTS = {"low_freq_factor": 1.0, "high_freq_factor": 4.0}


def _current(text: Any) -> tuple[str, dict[str, Any]]:
    """``(attribute, params)``: where this transformers version keeps the rope settings, and their value."""
    attribute = "rope_parameters" if hasattr(text, "rope_parameters") else "rope_scaling"
    return attribute, dict(getattr(text, attribute, None) or {})


def scaled_parameters(text: Any, scaling: dict[str, Any]) -> tuple[dict[str, Any], int]:
    """The rope settings with ``scaling`` applied, and the new ``max_position_embeddings``.

    Args:
        text: the (text) model config.
        scaling: ``model.rope_scaling`` without unset keys.
    """
    attribute, current = _current(text)
    kind = scaling["rope_type"]
    kept = ("rope_theta", "partial_rotary_factor") if attribute == "rope_parameters" else ()  # 5.x keeps them here
    params = {key: current[key] for key in kept if key in current}
    params.update(scaling)
    context = int(text.max_position_embeddings)
    original = int(scaling.get("original_max_position_embeddings") or context)
    if kind in NEEDS_ORIGINAL:
        params["original_max_position_embeddings"] = original
    if kind == "llama3":
        params = {**LLAMA3_DEFAULTS, **params}
    if kind in EXTENDS_CONTEXT and scaling.get("factor"):
        context = int(original * scaling["factor"])
    return params, context


def apply_rope_scaling(hf_config: Any, scaling: dict[str, Any] | None) -> str | None:
    """Set ``scaling`` on ``hf_config`` (its text config for multimodal models) in place.

    A config that already carries this scaling (a checkpoint saved after it was applied) is left
    as it is, so loading a run's own output again does not scale twice.

    Returns:
        the run summary's line, or ``None`` when there is nothing to apply.

    Raises:
        ConfigError: the model keeps per-layer-type rope settings without a ``full_attention`` entry,
            or transformers rejects the result.
    """
    if not scaling:
        return None
    scaling = {key: value for key, value in scaling.items() if value is not None}
    text = hf_config.get_text_config()
    attribute, current = _current(text)
    nested = "full_attention" in current and isinstance(current["full_attention"], dict)
    active = dict(current["full_attention"]) if nested else current
    if any(key in current for key in ("sliding_attention", "local_attention")) and not nested:
        raise ConfigError("model.rope_scaling: this model keeps rope settings per layer type without a "
                          "full_attention entry; scale it in its config.json instead")
    if all(active.get(key) == value for key, value in scaling.items()) and active.get("rope_type") is not None:
        return f"rope scaling: {scaling['rope_type']} already in the model's config"
    params, context = scaled_parameters(text, scaling)
    if nested:  # Gemma 3: only the global layers' rope is scaled, as its own long-context configs do
        params = {**current, "full_attention": {**active, **params}}
    before = int(text.max_position_embeddings)
    text.max_position_embeddings = context
    if scaling["rope_type"] == "longrope" and hasattr(text, "original_max_position_embeddings"):
        text.original_max_position_embeddings = params["original_max_position_embeddings"]  # Phi-3 reads it first
    setattr(text, attribute, params)
    try:
        if hasattr(text, "standardize_rope_params"):
            text.standardize_rope_params()
            text.validate_rope()
    except (KeyError, ValueError, TypeError) as exc:
        raise ConfigError(f"model.rope_scaling: transformers rejects it for this model: {exc}") from None
    return (f"rope scaling: {scaling['rope_type']}" + (f" x{scaling['factor']:g}" if "factor" in scaling else "")
            + f", context {before} -> {context} tokens")
