"""Gemma 3: the text model (``gemma3_text``) and the text side of the multimodal ``gemma3``.

Gemma 2's layout without attention softcapping, plus RMS norms on the per-head queries and keys
(``q_norm`` / ``k_norm``, patched as ``rms_norm`` with ``offset=1.0`` and applied before rope),
local (sliding-window, rope base 10k) and global layers (their own rope base and scaling: the
attention takes whichever ``position_embeddings`` its layer gets). The vision tower and projector
of ``gemma3`` run Hugging Face's code (LoRA reaches the SigLIP tower's projections through
``lora.finetune_vision_layers``); the fused loss serves ``Gemma3ForConditionalGeneration`` too.
GGUF: architecture ``gemma3`` (text weights; the vision side belongs in a separate mmproj file);
norms ``1 + w``; rope base and scaling of the global layers; the window when any layer slides.
"""

from __future__ import annotations

from typing import Any

from ftengine.plugins.models._adapter import DecoderAdapter
from ftengine.plugins.models._gguf import GGUFLayout
from ftengine.plugins.models._gguf import head_lengths
from ftengine.plugins.models._patching import PatchTable
from ftengine.plugins.models._vision import VisionSpec


def gemma3_metadata(config: Any) -> dict[str, Any]:
    """Head lengths, the final softcap when set, and the sliding window when a layer uses it."""
    meta = head_lengths(config)
    if getattr(config, "final_logit_softcapping", None):
        meta["final_logit_softcapping"] = float(config.final_logit_softcapping)
    layer_types = getattr(config, "layer_types", None) or ()
    if "sliding_attention" in layer_types and config.sliding_window:
        meta["attention.sliding_window"] = int(config.sliding_window)
    return meta


ADAPTER = DecoderAdapter(
    name="gemma3",
    model_types=("gemma3_text", "gemma3"),
    table=PatchTable(
        norms=("Gemma3RMSNorm",),
        norm_offset=1.0,
        attentions=("Gemma3Attention",),
        attention_kwargs=(("sliding_window", "sliding_window"),),
        mlps=("Gemma3MLP",),
        causal_lms=("Gemma3ForCausalLM", "Gemma3ForConditionalGeneration"),
        final_softcap="final_logit_softcapping",
    ),
    default_chat_template="gemma-3",
    gguf=GGUFLayout(
        architecture="gemma3",
        norm_shift=1.0,
        skip=(r"(^|\.)vision_tower\.", r"(^|\.)multi_modal_projector\."),
        renames=(("model.language_model.", "model."), ("language_model.model.", "model."),
                 ("language_model.lm_head.", "lm_head.")),
        extra_metadata=gemma3_metadata,
    ),
    vision=VisionSpec(language="model.language_model", vision="model.vision_tower",
                      projector="model.multi_modal_projector"),
)
