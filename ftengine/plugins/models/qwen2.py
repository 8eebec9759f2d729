"""Qwen2 and Qwen2.5.

Llama's layout plus biases on the q/k/v projections (the fused ops take them) and a sliding
window that only some checkpoints enable. GGUF: architecture ``qwen2``; q/k rows stay as they are
(llama.cpp runs Qwen2 with the rotate-half rope); YaRN scaling becomes ``rope.scaling.*`` keys.
"""

from __future__ import annotations

from ftengine.plugins.models._adapter import DecoderAdapter
from ftengine.plugins.models._gguf import GGUFLayout
from ftengine.plugins.models._gguf import head_lengths
from ftengine.plugins.models._patching import PatchTable

ADAPTER = DecoderAdapter(
    name="qwen2",
    model_types=("qwen2",),
    table=PatchTable(
        norms=("Qwen2RMSNorm",),
        attentions=("Qwen2Attention",),
        attention_kwargs=(("sliding_window", "sliding_window"),),
        mlps=("Qwen2MLP",),
        causal_lms=("Qwen2ForCausalLM",),
    ),
    default_chat_template="qwen2.5",
    gguf=GGUFLayout(
        architecture="qwen2",
        extra_metadata=head_lengths,
    ),
)
