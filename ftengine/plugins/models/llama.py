"""Llama 2, 3, 3.1 (frequency-dependent rope scaling), 3.2 and 3.3.

RMSNorm ``w * x_hat``; grouped-query attention with rotate-half rope; SwiGLU MLP; untied or tied
LM head. GGUF: architecture ``llama``; q/k rows regrouped to llama.cpp's rotary order; Llama 3.1
scaling exported as the ``rope_freqs.weight`` tensor (:meth:`GGUFLayout.extra_tensors`).
"""

from __future__ import annotations

from ftengine.plugins.models._adapter import DecoderAdapter
from ftengine.plugins.models._gguf import GGUFLayout
from ftengine.plugins.models._gguf import vocab_and_head_lengths
from ftengine.plugins.models._patching import PatchTable

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
    gguf=GGUFLayout(
        architecture="llama",
        permute_qk=True,
        extra_metadata=vocab_and_head_lengths,
    ),
)
