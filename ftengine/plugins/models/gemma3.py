"""Gemma 3: the text model (``gemma3_text``) and the text side of the multimodal ``gemma3``.

Gemma 2's layout without attention softcapping, plus RMS norms on the per-head queries and keys
(``q_norm`` / ``k_norm``, patched as ``rms_norm`` with ``offset=1.0`` and applied before rope),
local (sliding-window, rope base 10k) and global layers (their own rope base and scaling: the
attention takes whichever ``position_embeddings`` its layer gets). The vision tower and projector
of ``gemma3`` run Hugging Face's code (LoRA reaches the SigLIP tower's projections through
``lora.finetune_vision_layers``); the fused loss serves ``Gemma3ForConditionalGeneration`` too.
GGUF: architecture ``gemma3`` (text weights); norms ``1 + w``; rope base and scaling of the global
layers; the window when any layer slides. The SigLIP tower and projector go to an mmproj file
(projector ``gemma3``): the projector's RMSNorm as ``1 + w``, its bare ``mm_input_projection_weight``
``(vision, text)`` as is (llama.cpp transposes it in its graph), position embeddings in F32.
"""

from __future__ import annotations

from typing import Any

from ftengine.plugins.models._adapter import DecoderAdapter
from ftengine.plugins.models._gguf import GGUFLayout
from ftengine.plugins.models._gguf import head_lengths
from ftengine.plugins.models._mmproj import MmprojLayout
from ftengine.plugins.models._mmproj import tower_hparams
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


SIGLIP_MEAN = SIGLIP_STD = (0.5, 0.5, 0.5)
"""Gemma 3's image normalization: pixels scaled to [-1, 1]."""
DEFAULT_MERGE = 4
"""llama.cpp's default for Gemma 3: 4x4 patches pooled into one image token (64 x 64 patches -> 256 tokens)."""


def gemma3_mmproj_hparams(config: Any) -> dict[str, Any]:
    """The SigLIP tower's keys, and the pooling factor when it is not llama.cpp's default of 4.

    The projector average-pools the ``image_size / patch_size`` patches per side down to
    ``sqrt(mm_tokens_per_image)`` per side.
    """
    v = config.vision_config
    meta = tower_hparams(config, width=v.hidden_size, feed_forward=v.intermediate_size, blocks=v.num_hidden_layers,
                         heads=v.num_attention_heads, eps=v.layer_norm_eps, image_size=v.image_size,
                         patch_size=v.patch_size, activation=v.hidden_act)
    per_side = int(round(int(config.mm_tokens_per_image) ** 0.5))
    merge = (v.image_size // v.patch_size) // per_side
    if merge != DEFAULT_MERGE:
        meta["clip.vision.projector.scale_factor"] = int(merge)
    return meta


MMPROJ = MmprojLayout(
    projector_type="gemma3",
    renames=(("model.vision_tower.", "vision_tower.vision_model."), ("model.multi_modal_projector.",
                                                                    "multi_modal_projector.")),
    hparams=gemma3_mmproj_hparams,
    image_mean=SIGLIP_MEAN,
    image_std=SIGLIP_STD,
    norm_shift=("mm.soft_emb_norm.weight",),
    keep_f32=("v.position_embd.weight",),
    skip=(r"^model\.vision_tower\.head\.",),  # SigLIP's pooling head: Gemma 3 takes every patch
)

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
        mmproj=MMPROJ,
    ),
    vision=VisionSpec(language="model.language_model", vision="model.vision_tower",
                      projector="model.multi_modal_projector"),
)
