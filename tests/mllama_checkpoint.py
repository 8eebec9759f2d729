"""A tiny Llama 3.2 Vision checkpoint on disk (random weights, the demo's tokenizer with Llama 3's header and
``<|image|>`` tokens, a Llama-3-style chat template, a 28x28-tile image processor) for the data, API and
export tests of ``mllama``."""

from __future__ import annotations

from pathlib import Path

CHAT_TEMPLATE = (
    "{{- bos_token -}}"
    "{%- for message in messages -%}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' -}}"
    "{%- if message['content'] is string -%}{{- message['content'] -}}{%- else -%}"
    "{%- for part in message['content'] -%}"
    "{%- if part['type'] == 'image' -%}{{- '<|image|>' -}}"
    "{%- elif part['type'] == 'text' -%}{{- part['text'] -}}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "{{- '<|eot_id|>' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' -}}{%- endif -%}"
)
SPECIAL = ("<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>", "<|image|>")


def build(target: Path, seed: int = 0) -> Path:
    """Write the model, tokenizer and image processor into ``target``; returns it."""
    import torch
    from transformers import AutoTokenizer
    from transformers import MllamaConfig
    from transformers import MllamaForConditionalGeneration
    from transformers.models.mllama.image_processing_pil_mllama import MllamaImageProcessorPil

    from ftengine.demo import ASSETS

    tokenizer = AutoTokenizer.from_pretrained(str(ASSETS / "tokenizer"))
    tokenizer.add_tokens(list(SPECIAL), special_tokens=True)
    tokenizer.bos_token, tokenizer.eos_token = "<|begin_of_text|>", "<|eot_id|>"
    tokenizer.chat_template = CHAT_TEMPLATE
    image_id = tokenizer.convert_tokens_to_ids("<|image|>")
    text = dict(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                num_attention_heads=4, num_key_value_heads=2, cross_attention_layers=[1], max_position_embeddings=256,
                pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id, initializer_range=0.2,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_global_layers=1, attention_heads=2,
                  vision_output_dim=64, intermediate_layers_indices=[0], image_size=28, patch_size=14, max_num_tiles=2,
                  supported_aspect_ratios=[[1, 1], [1, 2], [2, 1]])
    config = MllamaConfig(text_config=text, vision_config=vision, image_token_index=image_id)
    torch.manual_seed(seed)
    model = MllamaForConditionalGeneration(config).to(torch.float32)
    for name, param in model.named_parameters():  # open the cross-attention gates (0 at initialisation)
        if name.endswith(("cross_attn_attn_gate", "cross_attn_mlp_gate")):
            param.data.fill_(0.7)
    model.save_pretrained(str(target))
    tokenizer.save_pretrained(str(target))
    MllamaImageProcessorPil(size={"height": 28, "width": 28}, max_image_tiles=2).save_pretrained(str(target))
    return target
