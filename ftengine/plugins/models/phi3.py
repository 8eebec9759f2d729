"""Phi-3, Phi-3.5 and Phi-4 (all ``model_type: phi3``; Phi-4-mini with partial rotary).

Llama's math with the q/k/v rows in one ``qkv_proj`` and the gate/up rows in one
``gate_up_proj`` (gate first): LoRA attaches to the fused projections, and the patched forwards
run each through ``lora_linear`` and split the result. The 128k checkpoints use LongRoPE
(``su``): Hugging Face's rotary module picks the short or long factors by sequence length and
scales cos/sin, which the patched attention consumes as they come. The sliding window (Phi-3-mini's
2047) is read from the config. GGUF: architecture ``phi3``; ``attn_qkv`` and ``ffn_up`` keep the
fused rows as llama.cpp expects; LongRoPE factors as the ``rope_factors_long`` / ``rope_factors_short``
tensors with the attention factor and the original context length as keys. The window is written
as llama.cpp's converter writes it, but llama.cpp (llama-cpp-python 0.3.36) runs Phi-3 without one:
its outputs match Hugging Face's up to the window's length (2047 tokens on Phi-3-mini).
"""

from __future__ import annotations

import math
from typing import Any

import torch

from ftengine.plugins.models import _gguf
from ftengine.plugins.models._adapter import DecoderAdapter
from ftengine.plugins.models._gguf import GGUFLayout
from ftengine.plugins.models._patching import PatchTable


def phi3_metadata(config: Any) -> dict[str, Any]:
    """The sliding window (0 when none, as llama.cpp's converter writes it for Phi-4) and LongRoPE's keys.

    llama.cpp scales cos/sin by ``rope.scaling.attn_factor``; Hugging Face's LongRoPE uses
    ``attention_factor`` when the config sets it, else ``sqrt(1 + ln(s) / ln(L))`` with
    ``s = factor`` (or ``max_position_embeddings / L``) and ``L`` the original context length.
    """
    meta: dict[str, Any] = {"attention.sliding_window": int(getattr(config, "sliding_window", None) or 0)}
    params = _gguf.rope_parameters(config)
    if params.get("rope_type", params.get("type")) not in ("longrope", "su"):
        return meta
    original = int(params.get("original_max_position_embeddings")
                   or getattr(config, "original_max_position_embeddings", None) or config.max_position_embeddings)
    factor = params.get("factor") or config.max_position_embeddings / original
    attention = params.get("attention_factor")
    if attention is None:
        attention = math.sqrt(1 + math.log(factor) / math.log(original)) if factor > 1.0 else 1.0
    meta["rope.scaling.attn_factor"] = float(attention)
    meta["rope.scaling.original_context_length"] = original
    return meta


def longrope_factors(config: Any) -> dict[str, torch.Tensor]:
    """``rope_factors_long.weight`` / ``rope_factors_short.weight``: the per-frequency divisors of LongRoPE."""
    params = _gguf.rope_parameters(config)
    if params.get("rope_type", params.get("type")) not in ("longrope", "su"):
        return {}
    return {"rope_factors_long.weight": torch.tensor(params["long_factor"], dtype=torch.float32),
            "rope_factors_short.weight": torch.tensor(params["short_factor"], dtype=torch.float32)}


ADAPTER = DecoderAdapter(
    name="phi3",
    model_types=("phi3",),
    table=PatchTable(
        norms=("Phi3RMSNorm",),
        attentions=("Phi3Attention",),
        attention_kwargs=(("sliding_window", "config.sliding_window"),),
        mlps=("Phi3MLP",),
        causal_lms=("Phi3ForCausalLM",),
        fused_qkv="qkv_proj",
        fused_gate_up="gate_up_proj",
    ),
    default_chat_template="phi-3.5",
    default_target_modules=("qkv_proj", "o_proj", "gate_up_proj", "down_proj"),
    gguf=GGUFLayout(
        architecture="phi3",
        extra_metadata=phi3_metadata,
        family_tensors=longrope_factors,
    ),
)
