"""Qwen3-MoE (Qwen3-30B-A3B, Qwen3-235B-A22B).

Qwen3's attention (per-head RMSNorm on q and k before the rope, handled by the shared attention
forward) with, in place of the dense MLP, a sparse block: a softmax top-k router (``mlp.gate``,
top-k weights renormalised when ``norm_topk_prob``) over experts fused in two 3-D parameters, run
on the ``lora_moe`` op. Layers listed in ``mlp_only_layers`` keep a dense SwiGLU MLP. LoRA targets
keep the per-expert names of transformers 4 (``gate_proj``, ``up_proj``, ``down_proj``; ``gate`` for
the router), which peft turns into ``target_parameters`` on the fused weights (gate and up share
one adapter of rank ``2r``). GGUF: architecture ``qwen3moe``.
"""

from __future__ import annotations

from typing import Any

from ftengine.plugins.models import _moe
from ftengine.plugins.models._adapter import DecoderAdapter
from ftengine.plugins.models._gguf import GGUFLayout
from ftengine.plugins.models._gguf import head_lengths
from ftengine.plugins.models._patching import PatchTable


def qwen3_moe_metadata(config: Any) -> dict[str, Any]:
    """Head lengths, the expert counts and the experts' own FFN width (``moe_intermediate_size``)."""
    return {**head_lengths(config), **_moe.expert_metadata(config),
            "expert_feed_forward_length": int(config.moe_intermediate_size)}


ADAPTER = DecoderAdapter(
    name="qwen3_moe",
    model_types=("qwen3_moe",),
    table=PatchTable(
        norms=("Qwen3MoeRMSNorm",),
        attentions=("Qwen3MoeAttention",),
        attention_kwargs=(("sliding_window", "sliding_window"),),
        mlps=("Qwen3MoeMLP",),
        moes=("Qwen3MoeSparseMoeBlock",),
        causal_lms=("Qwen3MoeForCausalLM",),
    ),
    default_chat_template="qwen2.5",
    gguf=GGUFLayout(
        architecture="qwen3moe",
        extra_metadata=qwen3_moe_metadata,
    ),
)
