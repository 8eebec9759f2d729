"""Mixtral (8x7B, 8x22B).

Mistral's attention and norms with a sparse block in every layer: a softmax top-2 router
(``mlp.gate``, weights renormalised over the chosen two, optional multiplicative jitter while
training) over experts fused in two 3-D parameters, run on the ``lora_moe`` op. LoRA targets keep
the expert names of transformers 4 (``w1`` gate, ``w3`` up, ``w2`` down; ``gate`` for the router),
which peft turns into ``target_parameters`` on the fused weights. GGUF: llama.cpp runs it as
``llama`` with expert tensors (q/k rows regrouped as for Llama).
"""

from __future__ import annotations

from typing import Any

from ftengine.plugins.models import _moe
from ftengine.plugins.models._adapter import DecoderAdapter
from ftengine.plugins.models._gguf import GGUFLayout
from ftengine.plugins.models._gguf import vocab_and_head_lengths
from ftengine.plugins.models._patching import PatchTable


def mixtral_metadata(config: Any) -> dict[str, Any]:
    """Llama's keys plus the expert counts (``feed_forward_length`` is already each expert's width)."""
    return {**vocab_and_head_lengths(config), **_moe.expert_metadata(config)}


ADAPTER = DecoderAdapter(
    name="mixtral",
    model_types=("mixtral",),
    table=PatchTable(
        norms=("MixtralRMSNorm",),
        attentions=("MixtralAttention",),
        mlps=(),
        moes=("MixtralSparseMoeBlock",),
        causal_lms=("MixtralForCausalLM",),
    ),
    default_chat_template="mistral",
    default_target_modules=("q_proj", "k_proj", "v_proj", "o_proj", "w1", "w2", "w3"),
    gguf=GGUFLayout(
        architecture="llama",
        permute_qk=True,
        extra_metadata=mixtral_metadata,
    ),
)
