"""Qwen2-VL and Qwen2.5-VL: a Qwen2 language tower with multimodal rope, and a ViT whose patch
merger projects 2x2 patches into the text's embedding space.

The language tower is Qwen2's (biased q/k/v, SwiGLU, RMSNorm). Its rope is "mrope": each position
has three ids (time, height, width; equal for text tokens) and the rotary frequencies are split in
``mrope_section`` parts, each taking its angle from one of the three ids. transformers composes
those sections inside the rotary embedding, so the attention receives ordinary ``(B, T, D)`` cos and
sin tables and the ``rope`` op applies them unchanged. In both vision towers the attention runs every
image (Qwen2-VL) or window (Qwen2.5-VL) in one SDPA call with fused LoRA projections
(:mod:`~ftengine.plugins.models._vit_attention`); Qwen2.5-VL's tower shares the language tower's RMSNorm
class and has a gated SwiGLU MLP (with biases), both patched like the language tower's; Qwen2-VL's
LayerNorms and plain GELU MLP run Hugging Face's code (LoRA can still reach their projections).
GGUF: llama.cpp's ``qwen2vl`` architecture for the language tower, the mrope sections as
``rope.dimension_sections``; the vision tower and merger as an mmproj file (projector
``qwen2vl_merger`` / ``qwen2.5vl_merger``): fused qkv split in three, the two-frame Conv3d patch
embedding as two Conv2d halves, the merger's norm as ``v.post_ln`` and its MLP as ``mm.0`` / ``mm.2``.
"""

from __future__ import annotations

from typing import Any

from ftengine.plugins.models._adapter import DecoderAdapter
from ftengine.plugins.models._gguf import GGUFLayout
from ftengine.plugins.models._gguf import head_lengths
from ftengine.plugins.models._mmproj import OPENAI_CLIP_MEAN
from ftengine.plugins.models._mmproj import OPENAI_CLIP_STD
from ftengine.plugins.models._mmproj import MmprojLayout
from ftengine.plugins.models._mmproj import split_fused_qkv
from ftengine.plugins.models._mmproj import split_temporal_patch
from ftengine.plugins.models._mmproj import tower_hparams
from ftengine.plugins.models._patching import PatchTable
from ftengine.plugins.models._vision import VisionSpec
from ftengine.plugins.models._vit_attention import vision_attention_forward

LANGUAGE_RENAMES = (("model.language_model.", "model."),)
VISION_PARTS = (r"(^|\.)visual\.",)
VISION_RENAMES = (("model.visual.", "visual."), ("visual.", "visual."))
VISION_EPS = 1e-6
"""The vision blocks' and merger's norm epsilon (fixed in transformers' Qwen VL code, not in the config)."""
IMAGE_SIZE = 560
"""``clip.vision.image_size``: Qwen's images have no fixed size; llama.cpp sizes its warm-up image by it."""


def qwen2_vl_metadata(config: Any) -> dict[str, Any]:
    """Head lengths, and the mrope sections padded to the four llama.cpp reads."""
    sections = list((getattr(config, "rope_parameters", None) or {}).get("mrope_section") or ())
    meta = head_lengths(config)
    if sections:
        meta["rope.dimension_sections"] = [int(s) for s in sections] + [0] * (4 - len(sections))
    return meta


def qwen2_vl_hparams(config: Any) -> dict[str, Any]:
    """Qwen2-VL's tower: ``embed_dim`` wide, an MLP of ``embed_dim * mlp_ratio`` (its ``hidden_size`` is the merger's
    output width), LayerNorms."""
    v = config.vision_config
    return {**tower_hparams(config, width=v.embed_dim, feed_forward=int(v.embed_dim * v.mlp_ratio), blocks=v.depth,
                            heads=v.num_heads, eps=VISION_EPS, image_size=IMAGE_SIZE, patch_size=v.patch_size,
                            activation=v.hidden_act),
            "clip.vision.spatial_merge_size": int(v.spatial_merge_size)}


def qwen2_5_vl_hparams(config: Any) -> dict[str, Any]:
    """Qwen2.5-VL's tower: RMSNorms, a gated MLP, and window attention except every ``n_wa_pattern``-th block.

    Raises:
        ValueError: full-attention blocks that do not recur at one period (llama.cpp's single pattern).
    """
    v = config.vision_config
    full = list(v.fullatt_block_indexes)
    period = full[0] + 1 if full else 0
    if not full or any(b - a != period for a, b in zip(full, full[1:], strict=False)):
        raise ValueError(f"llama.cpp's Qwen2.5-VL graph needs full-attention blocks at a fixed period (every n-th "
                         f"block); this model has them at {full}")
    return {**tower_hparams(config, width=v.hidden_size, feed_forward=v.intermediate_size, blocks=v.depth,
                            heads=v.num_heads, eps=VISION_EPS, image_size=IMAGE_SIZE, patch_size=v.patch_size,
                            activation=v.hidden_act),
            "clip.vision.spatial_merge_size": int(v.spatial_merge_size),
            "clip.vision.n_wa_pattern": period}


def split_qwen_vision(name: str, tensor: Any) -> list[tuple[str, Any]]:
    """Fused qkv as q, k, v; the two-frame patch embedding as two 2-D convolutions."""
    return [part for item in split_fused_qkv(name, tensor) for part in split_temporal_patch(*item)]


def qwen_vl_mmproj(projector_type: str, hparams: Any) -> MmprojLayout:
    """The mmproj layout of a Qwen VL generation."""
    return MmprojLayout(projector_type=projector_type, renames=VISION_RENAMES, hparams=hparams,
                        image_mean=OPENAI_CLIP_MEAN, image_std=OPENAI_CLIP_STD, split=split_qwen_vision)


def qwen_vl_adapter(name: str, classes: str, vision_mlp: tuple[str, ...], mmproj: MmprojLayout,
                    tower: PatchTable | None = None) -> DecoderAdapter:
    """A Qwen VL generation's adapter; ``classes`` prefixes its Hugging Face class names; ``tower``: what to patch
    in the vision tower."""
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
                        extra_metadata=qwen2_vl_metadata, mmproj=mmproj),
        vision=VisionSpec(language="model.language_model", vision="model.visual", projector="model.visual.merger",
                          vision_attention=("attn.qkv", "attn.proj"), vision_mlp=vision_mlp, tower=tower),
    )


QWEN2_VL = qwen_vl_adapter("qwen2_vl", "Qwen2VL", vision_mlp=("fc1", "fc2"),
                           mmproj=qwen_vl_mmproj("qwen2vl_merger", qwen2_vl_hparams),
                           tower=PatchTable(norms=(), attentions=(), mlps=(), causal_lms=(),
                                            custom=(("VisionAttention", vision_attention_forward),)))
QWEN2_5_VL = qwen_vl_adapter("qwen2_5_vl", "Qwen2_5_VL", vision_mlp=("gate_proj", "up_proj", "down_proj"),
                             mmproj=qwen_vl_mmproj("qwen2.5vl_merger", qwen2_5_vl_hparams),
                             tower=PatchTable(norms=("Qwen2_5_VLRMSNorm",), attentions=(), mlps=("Qwen2_5_VLMLP",),
                                              causal_lms=(),
                                              custom=(("Qwen2_5_VLVisionAttention", vision_attention_forward),)))
