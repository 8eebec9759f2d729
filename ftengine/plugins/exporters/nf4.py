"""Merged weights requantized to bitsandbytes NF4, in the layout transformers saves 4-bit models in.

The LoRA is merged in dequantized (16/32-bit) space, then every linear layer of the decoder (not the
LM head, which transformers keeps unquantized) is quantized to NF4 in blocks of 64 with
``bitsandbytes.functional.quantize_4bit``; its quantization state is stored beside the packed weight
as transformers serializes it (``<name>.weight.absmax``, ``.quant_map``,
``.quant_state.bitsandbytes__nf4``), and config.json gets the matching ``quantization_config``, so
``AutoModelForCausalLM.from_pretrained(dir)`` loads a 4-bit model. This is lossy: the merged weights
are rounded to 4 bits again (the trained QLoRA model computed with the old 4-bit base plus a 16-bit
LoRA delta).
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import nn

from ftengine.plugins.exporters.merged_tensors import checkpoint_layer_name

BLOCKSIZE = 64


def linear_weight_names(model: nn.Module) -> set[str]:
    """Checkpoint names of the weights of the linear layers NF4 quantizes (all but the output head)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    head = base.get_output_embeddings()
    head_names = {name for name, module in base.named_modules() if module is head}
    names = set()
    for module_name, module in base.named_modules():
        layer = checkpoint_layer_name(module_name)
        if isinstance(module, nn.Linear) and layer is not None and layer not in head_names:
            names.add(f"{layer}.weight")
    return names


def quantize_tensors(name: str, weight: torch.Tensor, compute_dtype: torch.dtype) -> Iterator[tuple[str, torch.Tensor]]:
    """``(name, tensor)`` pairs of one NF4 weight: the packed values and the flattened quantization state."""
    from bitsandbytes.functional import quantize_4bit

    packed, state = quantize_4bit(weight.to(compute_dtype).contiguous(), blocksize=BLOCKSIZE,
                                  compress_statistics=False, quant_type="nf4", quant_storage=torch.uint8)
    yield name, packed
    for key, value in state.as_dict(packed=True).items():
        yield f"{name}.{key}", value


def quantization_config(compute_dtype: torch.dtype) -> dict:
    """config.json's ``quantization_config`` for the saved NF4 weights."""
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=False,
                              bnb_4bit_compute_dtype=compute_dtype, bnb_4bit_quant_storage=torch.uint8).to_dict()
