"""Qwen3 (dense: 0.6B to 32B, and the 2507 updates).

Llama's layout without the q/k/v biases of Qwen2, plus RMS norms on each query and key head
(``q_norm`` / ``k_norm``, patched as ``rms_norm`` and applied before rope), an explicit
``head_dim`` (128, wider than ``hidden_size / heads`` on the small sizes), tied embeddings on the
small sizes and an optional sliding window on the upper layers. GGUF: architecture ``qwen3``
(rotate-half rope, so q/k rows stay as they are), norms as ``attn_q_norm`` / ``attn_k_norm``; YaRN
scaling becomes ``rope.scaling.*`` keys.
"""

from __future__ import annotations

from ftengine.plugins.models._adapter import DecoderAdapter
from ftengine.plugins.models._gguf import GGUFLayout
from ftengine.plugins.models._gguf import head_lengths
from ftengine.plugins.models._patching import PatchTable

ADAPTER = DecoderAdapter(
    name="qwen3",
    model_types=("qwen3",),
    table=PatchTable(
        norms=("Qwen3RMSNorm",),
        attentions=("Qwen3Attention",),
        attention_kwargs=(("sliding_window", "sliding_window"),),
        mlps=("Qwen3MLP",),
        causal_lms=("Qwen3ForCausalLM",),
    ),
    default_chat_template="qwen3",
    gguf=GGUFLayout(
        architecture="qwen3",
        extra_metadata=head_lengths,
    ),
)
