"""Llama 2, 3, 3.1 (frequency-dependent rope scaling), 3.2 and 3.3.

RMSNorm ``w * x_hat``; grouped-query attention with rotate-half rope; SwiGLU MLP; untied or tied
LM head. GGUF: architecture ``llama``; q/k rows regrouped to llama.cpp's rotary order; Llama 3.1
scaling exported as the ``rope_freqs.weight`` tensor (:meth:`DecoderAdapter.gguf_extra_tensors`).
"""

from __future__ import annotations

from typing import Any

from ftengine.plugins.models._adapter import DecoderAdapter
from ftengine.plugins.models._patching import PatchTable


def head_lengths(config: Any) -> dict[str, Any]:
    """``attention.key_length`` / ``value_length`` when ``head_dim`` is set explicitly (as llama.cpp's converter)."""
    head_dim = getattr(config, "head_dim", None)
    if head_dim is None:
        return {}
    return {"attention.key_length": int(head_dim), "attention.value_length": int(head_dim)}


def llama_metadata(config: Any) -> dict[str, Any]:
    """Llama keys beyond rope: the vocabulary size and explicit head lengths."""
    return {"vocab_size": int(config.vocab_size), **head_lengths(config)}


ADAPTER = DecoderAdapter(
    name="llama",
    model_types=("llama",),
    table=PatchTable(
        norms=("LlamaRMSNorm",),
        attentions=("LlamaAttention",),
        mlps=("LlamaMLP",),
        causal_lms=("LlamaForCausalLM",),
    ),
    default_chat_template="llama-3.1",
    gguf_architecture="llama",
    gguf_permute_qk=True,
    gguf_extra_metadata=llama_metadata,
)
