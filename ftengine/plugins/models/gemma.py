"""Gemma (1.0, 1.1, CodeGemma).

RMSNorm ``(1 + w) * x_hat`` (the ``rms_norm`` op with ``offset=1.0``); GeGLU MLP with the tanh
GELU; embeddings scaled by ``sqrt(hidden)`` inside the untouched embedding path; tied LM head.
GGUF: architecture ``gemma``; norms stored as ``1 + w``; ``lm_head.weight`` dropped (llama.cpp
reuses the embedding), as llama.cpp's converter does.
"""

from __future__ import annotations

from ftengine.plugins.models._adapter import DecoderAdapter
from ftengine.plugins.models._gguf import GGUFLayout
from ftengine.plugins.models._gguf import head_lengths
from ftengine.plugins.models._patching import PatchTable

ADAPTER = DecoderAdapter(
    name="gemma",
    model_types=("gemma",),
    table=PatchTable(
        norms=("GemmaRMSNorm",),
        norm_offset=1.0,
        attentions=("GemmaAttention",),
        mlps=("GemmaMLP",),
        causal_lms=("GemmaForCausalLM",),
    ),
    default_chat_template="gemma",
    gguf=GGUFLayout(
        architecture="gemma",
        norm_shift=1.0,
        skip=(r"^lm_head\.weight$",),
        extra_metadata=head_lengths,
    ),
)
