"""Tiny vision-language configs and image batches for the adapter tests (no processor needed: the
pixel tensors are random and the image tokens are placed by hand, as many as the tower yields)."""

from __future__ import annotations

import re
from typing import Any

import torch

from .helpers import DEVICE

VOCAB = 128
IMAGE_TOKEN, VISION_START, VISION_END, VIDEO_TOKEN = 120, 122, 123, 121


def qwen_vl_config(version: str = "2.5") -> Any:
    """A tiny Qwen2-VL (``"2"``) or Qwen2.5-VL (``"2.5"``) config: 2 text layers, 2 vision blocks."""
    from transformers import Qwen2_5_VLConfig
    from transformers import Qwen2VLConfig

    text = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=128, initializer_range=0.2,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [1, 1, 2]})
    tokens = dict(image_token_id=IMAGE_TOKEN, video_token_id=VIDEO_TOKEN, vision_start_token_id=VISION_START,
                  vision_end_token_id=VISION_END)
    if version == "2":
        vision = dict(depth=2, embed_dim=32, hidden_size=32, mlp_ratio=2, num_heads=2, patch_size=14,
                      spatial_merge_size=2, temporal_patch_size=2)
        cfg = Qwen2VLConfig(text_config=text, vision_config=vision, **tokens)
    else:
        vision = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, patch_size=14, spatial_merge_size=2,
                      temporal_patch_size=2, out_hidden_size=32, window_size=56, fullatt_block_indexes=[1])
        cfg = Qwen2_5_VLConfig(text_config=text, vision_config=vision, **tokens)
    cfg._attn_implementation = "sdpa"
    cfg.text_config._attn_implementation = "sdpa"
    cfg.vision_config._attn_implementation = "sdpa"
    return cfg


def qwen_vl_batch(seed: int = 1) -> dict[str, torch.Tensor]:
    """Two rows, each with one image (grids 4x4 and 2x4 patches: 4 and 2 merged tokens), the second
    right-padded; labels -100 on the prompt, the image tokens and the padding."""
    g = torch.Generator().manual_seed(seed)
    grids = torch.tensor([[1, 4, 4], [1, 2, 4]])
    rows, width = [], 16
    for grid in grids:
        n_tokens = int(grid.prod()) // 4
        prompt = torch.randint(0, 100, (3,), generator=g).tolist()
        answer = torch.randint(0, 100, (4,), generator=g).tolist()
        rows.append(prompt + [VISION_START] + [IMAGE_TOKEN] * n_tokens + [VISION_END] + answer)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    labels = torch.full_like(ids, -100)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = torch.tensor(row)
        mask[i, : len(row)] = 1
        labels[i, len(row) - 4: len(row)] = torch.tensor(row[-4:])
    patches = int(grids.prod(dim=1).sum())
    pixels = torch.randn(patches, 3 * 2 * 14 * 14, generator=g)
    return {"input_ids": ids.to(DEVICE), "attention_mask": mask.to(DEVICE), "labels": labels.to(DEVICE),
            "pixel_values": pixels.to(DEVICE), "image_grid_thw": grids.to(DEVICE),
            "mm_token_type_ids": (ids == IMAGE_TOKEN).long().to(DEVICE)}


MLLAMA_IMAGE = VOCAB  # Llama 3.2 Vision's ``<|image|>`` is the first id past the LM head's vocabulary


def mllama_config(**text_overrides: Any) -> Any:
    """A tiny Llama 3.2 Vision config: 3 text layers (the middle one cross-attention), a ViT of 2 local and
    1 global layer on 28x28 tiles of 14x14 patches, at most 2 tiles per image."""
    from transformers import MllamaConfig

    text = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                num_key_value_heads=2, cross_attention_layers=[1], max_position_embeddings=128, pad_token_id=0,
                bos_token_id=1, eos_token_id=2, initializer_range=0.2,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    text.update(text_overrides)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_global_layers=1, attention_heads=2,
                  vision_output_dim=64, intermediate_layers_indices=[0], image_size=28, patch_size=14, max_num_tiles=2,
                  supported_aspect_ratios=[[1, 1], [1, 2], [2, 1]])
    cfg = MllamaConfig(text_config=text, vision_config=vision, image_token_index=MLLAMA_IMAGE)
    for c in (cfg, cfg.text_config, cfg.vision_config):
        c._attn_implementation = "sdpa"
    return cfg


def mllama_batch(seed: int = 1) -> dict[str, torch.Tensor]:
    """Two rows with one image each (the first split in 2 tiles, the second in 1), the second right-padded;
    ``<|image|>`` opens the prompt and every later token attends to the image's tiles; labels on the answer."""
    g = torch.Generator().manual_seed(seed)
    width, tiles = 16, (2, 1)
    ids = torch.zeros(2, width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    labels = torch.full_like(ids, -100)
    cross = torch.zeros(2, width, 1, 2, dtype=torch.long)  # (B, T, images, max tiles)
    for i, length in enumerate((width, width - 5)):
        ids[i, 0] = MLLAMA_IMAGE
        ids[i, 1:length] = torch.randint(3, 100, (length - 1,), generator=g)
        mask[i, :length] = 1
        labels[i, length - 5:length] = ids[i, length - 5:length]
        cross[i, :length, 0, :tiles[i]] = 1
    pixels = torch.randn(2, 1, 2, 3, 28, 28, generator=g)  # (B, images, max tiles, C, H, W)
    aspect_ids = torch.tensor([[2], [1]])  # [1, 2] and [1, 1] among the supported ratios, 1-based
    aspect_mask = torch.tensor([[[1, 1]], [[1, 0]]])
    out = {"input_ids": ids, "attention_mask": mask, "labels": labels, "pixel_values": pixels,
           "aspect_ratio_ids": aspect_ids, "aspect_ratio_mask": aspect_mask, "cross_attention_mask": cross}
    return {k: v.to(DEVICE) for k, v in out.items()}


def chosen_modules(spec: Any, model: Any, **switches: bool) -> set[str]:
    """The module names of ``model`` that a vision spec's ``lora.finetune_*`` switches make LoRA targets."""
    pattern = spec.target_modules(**switches)
    return {n for n, _ in model.named_modules() if pattern and re.fullmatch(pattern, n)}
