"""Mistral (7B v0.1-v0.3, Nemo and the other dense ``mistral`` checkpoints).

Llama's layout with an optional sliding window (passed to the attention function) and, on Nemo,
an explicit ``head_dim``. GGUF: llama.cpp runs it as ``llama`` (q/k rows regrouped likewise).
"""

from __future__ import annotations

from ftengine.plugins.models._adapter import DecoderAdapter
from ftengine.plugins.models._gguf import GGUFLayout
from ftengine.plugins.models._gguf import vocab_and_head_lengths
from ftengine.plugins.models._patching import PatchTable

ADAPTER = DecoderAdapter(
    name="mistral",
    model_types=("mistral",),
    table=PatchTable(
        norms=("MistralRMSNorm",),
        attentions=("MistralAttention",),
        attention_kwargs=(("sliding_window", "sliding_window"),),
        mlps=("MistralMLP",),
        causal_lms=("MistralForCausalLM",),
    ),
    default_chat_template="mistral",
    gguf=GGUFLayout(
        architecture="llama",
        permute_qk=True,
        extra_metadata=vocab_and_head_lengths,
    ),
)
