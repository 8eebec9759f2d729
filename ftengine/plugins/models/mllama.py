"""Llama 3.2 Vision (``mllama``): a Llama 3.1 language tower with gated cross-attention layers that read
the image features, a two-stage ViT (local then global layers, tile embeddings per aspect ratio) and
a linear projector.

The language tower's self-attention layers are Llama's (rope, no biases, SwiGLU): they take the fused
ops. Every few layers a cross-attention layer replaces self-attention: its queries come from the text,
its keys and values from the projected image features, with per-head RMS norms on queries and keys,
no rope, and tanh gates on the attention and MLP residuals (the layer's own forward keeps the gates).
Its projections run on ``lora_linear``, its norms on ``rms_norm`` and its MLP on ``lora_mlp``; the
attention itself is the configured implementation with the cross-attention mask, as Hugging Face's.
The vision tower runs Hugging Face's code (LoRA reaches its q/k/v/o and fc1/fc2 projections).
A prompt holds one ``<|image|>`` token per image, not one per patch: the image features enter
through the cross-attention layers only, so a row costs one text token per image.
No GGUF layout: llama.cpp has no ``mllama`` architecture.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from ftengine.plugins.models._adapter import DecoderAdapter
from ftengine.plugins.models._patching import GetOp
from ftengine.plugins.models._patching import PatchTable
from ftengine.plugins.models._patching import attention_function
from ftengine.plugins.models._patching import linear_projection
from ftengine.plugins.models._vision import VisionSpec


def cross_attention_forward(get_op: GetOp) -> Callable[..., Any]:
    """The forward of ``MllamaTextCrossAttention`` on the fused ops: text queries, image keys and values."""

    def forward(
        self: nn.Module,
        hidden_states: torch.Tensor,
        cross_attention_states: torch.Tensor | None = None,
        past_key_values: Any = None,
        attention_mask: torch.Tensor | None = None,
        use_cache: bool | None = None,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        batch, length = hidden_states.shape[:2]
        q = linear_projection(get_op, self.q_proj, hidden_states, "cross-attention q_proj")  # (B, T, heads * D)
        q = self.q_norm(q.view(batch, length, -1, self.head_dim).transpose(1, 2))  # (B, heads, T, D)
        if cross_attention_states is not None:
            # (B, images * tiles * patches, H) -> (B, kv_heads, S, D)
            k, v = (linear_projection(get_op, p, cross_attention_states, f"cross-attention {name}")
                    .view(batch, -1, self.num_key_value_heads, self.head_dim).transpose(1, 2)
                    for p, name in ((self.k_proj, "k_proj"), (self.v_proj, "v_proj")))
            k = self.k_norm(k)
            if past_key_values is not None:
                k, v = past_key_values.update(k, v, self.layer_idx)
        else:  # decoding after the image: the keys and values computed at the prompt
            layer = past_key_values.layers[self.layer_idx]
            k, v = layer.keys, layer.values
        attend = attention_function(self)
        out, weights = attend(self, q, k, v, attention_mask, dropout=self.dropout if self.training else 0.0,
                              scaling=self.scaling, **kwargs)
        out = out.reshape(batch, length, -1).contiguous()  # (B, T, heads * D)
        return linear_projection(get_op, self.o_proj, out, "cross-attention o_proj"), weights

    return forward


ADAPTER = DecoderAdapter(
    name="mllama",
    model_types=("mllama",),
    table=PatchTable(
        norms=("MllamaTextRMSNorm",),
        attentions=("MllamaTextSelfAttention",),
        mlps=("MllamaTextMLP",),
        causal_lms=("MllamaForConditionalGeneration", "MllamaForCausalLM"),
        custom=(("MllamaTextCrossAttention", cross_attention_forward),),
    ),
    default_chat_template=None,
    gguf=None,
    vision=VisionSpec(language="model.language_model", vision="model.vision_model",
                      projector="model.multi_modal_projector",
                      vision_attention=("q_proj", "k_proj", "v_proj", "o_proj"), max_images_per_turn=1),
)
