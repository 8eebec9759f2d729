"""Gemma 2.

Gemma's norms and GeGLU plus: norms after attention and around the MLP (pre/post feed-forward;
all patched as ``rms_norm`` with ``offset=1.0``), attention-logit softcapping and a sliding window
on alternate layers (both passed to the attention function, whose eager form applies the
softcap), ``query_pre_attn_scalar`` scaling (the module's own ``scaling``), and the final logit
softcap, which the fused loss applies (``linear_cross_entropy(..., softcap=...)``).
GGUF: architecture ``gemma2``; norms ``1 + w``; ``lm_head.weight`` dropped; the softcaps and the
window as keys.
"""

from __future__ import annotations

from typing import Any

from ftengine.plugins.models._adapter import DecoderAdapter
from ftengine.plugins.models._gguf import GGUFLayout
from ftengine.plugins.models._gguf import head_lengths
from ftengine.plugins.models._patching import PatchTable


def gemma2_metadata(config: Any) -> dict[str, Any]:
    """Head lengths, both softcaps and the sliding window, as llama.cpp's converter writes them."""
    return {
        **head_lengths(config),
        "attn_logit_softcapping": float(config.attn_logit_softcapping),
        "final_logit_softcapping": float(config.final_logit_softcapping),
        "attention.sliding_window": int(config.sliding_window),
    }


ADAPTER = DecoderAdapter(
    name="gemma2",
    model_types=("gemma2",),
    table=PatchTable(
        norms=("Gemma2RMSNorm",),
        norm_offset=1.0,
        attentions=("Gemma2Attention",),
        attention_kwargs=(("sliding_window", "sliding_window"), ("softcap", "attn_logit_softcapping")),
        mlps=("Gemma2MLP",),
        causal_lms=("Gemma2ForCausalLM",),
        final_softcap="final_logit_softcapping",
    ),
    default_chat_template="gemma-2",
    gguf=GGUFLayout(
        architecture="gemma2",
        norm_shift=1.0,
        skip=(r"^lm_head\.weight$",),
        extra_metadata=gemma2_metadata,
    ),
)
