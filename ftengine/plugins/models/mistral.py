"""Mistral (7B v0.1-v0.3, Nemo and the other dense ``mistral`` checkpoints).

Llama's layout with an optional sliding window (passed to the attention function) and, on Nemo,
an explicit ``head_dim``. GGUF: llama.cpp runs it as ``llama`` (q/k rows regrouped likewise).
"""

from __future__ import annotations

from ftengine.plugins.models._adapter import DecoderAdapter
from ftengine.plugins.models._patching import PatchTable
from ftengine.plugins.models.llama import llama_metadata

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
    gguf_architecture="llama",
    gguf_permute_qk=True,
    gguf_extra_metadata=llama_metadata,
)
