"""Qwen2-VL and Qwen2.5-VL: a Qwen2 language tower with multimodal rope, and a ViT whose patch
merger projects 2x2 patches into the text's embedding space.

The language tower is Qwen2's (biased q/k/v, SwiGLU, RMSNorm). Its rope is "mrope": each position
has three ids (time, height, width; equal for text tokens) and the rotary frequencies are split in
``mrope_section`` parts, each taking its angle from one of the three ids. transformers composes
those sections inside the rotary embedding, so the attention receives ordinary ``(B, T, D)`` cos and
sin tables and the ``rope`` op applies them unchanged. The vision tower runs Hugging Face's code
(LoRA can still reach its ``qkv``/``proj`` and MLP projections).
GGUF: llama.cpp's ``qwen2vl`` architecture for the language tower, the mrope sections as
``rope.dimension_sections``.
"""

from __future__ import annotations

from typing import Any

from ftengine.plugins.models._adapter import DecoderAdapter
from ftengine.plugins.models._gguf import GGUFLayout
from ftengine.plugins.models._gguf import head_lengths
from ftengine.plugins.models._patching import PatchTable
from ftengine.plugins.models._vision import VisionSpec

LANGUAGE_RENAMES = (("model.language_model.", "model."),)
VISION_PARTS = (r"(^|\.)visual\.",)


def qwen2_vl_metadata(config: Any) -> dict[str, Any]:
    """Head lengths, and the mrope sections padded to the four llama.cpp reads."""
    sections = list((getattr(config, "rope_parameters", None) or {}).get("mrope_section") or ())
    meta = head_lengths(config)
    if sections:
        meta["rope.dimension_sections"] = [int(s) for s in sections] + [0] * (4 - len(sections))
    return meta


def qwen_vl_adapter(name: str, classes: str, vision_mlp: tuple[str, ...]) -> DecoderAdapter:
    """A Qwen VL generation's adapter; ``classes`` prefixes its Hugging Face class names."""
    return DecoderAdapter(
        name=name,
        model_types=(name,),
        table=PatchTable(
            norms=(f"{classes}RMSNorm",),
            attentions=(f"{classes}Attention",),
            attention_kwargs=(("sliding_window", "sliding_window"),),
            mlps=("Qwen2MLP",),
            causal_lms=(f"{classes}ForConditionalGeneration",),
        ),
        default_chat_template=None,
        gguf=GGUFLayout(architecture="qwen2vl", skip=VISION_PARTS, renames=LANGUAGE_RENAMES,
                        extra_metadata=qwen2_vl_metadata),
        vision=VisionSpec(language="model.language_model", vision="model.visual", projector="model.visual.merger",
                          vision_attention=("attn.qkv", "attn.proj"), vision_mlp=vision_mlp),
    )


QWEN2_VL = qwen_vl_adapter("qwen2_vl", "Qwen2VL", vision_mlp=("fc1", "fc2"))
QWEN2_5_VL = qwen_vl_adapter("qwen2_5_vl", "Qwen2_5_VL", vision_mlp=("gate_proj", "up_proj", "down_proj"))
