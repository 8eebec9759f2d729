"""Random LoRA layers (16-bit or NF4 base) for the fused LoRA op tests."""

from __future__ import annotations

import torch

from ftengine.core.kernels import LoRAWeights

from .helpers import DEVICE


def make_layer(
    d_in: int, d_out: int, rank: int | None, dtype: torch.dtype, gen: torch.Generator, nf4: bool = False,
    bias: bool = False, adapter_dtype: torch.dtype | None = None,
) -> LoRAWeights:
    """A frozen base weight (bf16/fp16/fp32 or NF4-packed) and, unless ``rank`` is None, a trainable adapter."""
    w = (torch.randn(d_out, d_in, generator=gen) / d_in**0.5).to(dtype).to(DEVICE)
    quant_state = None
    if nf4:
        import bitsandbytes.functional as bnb_functional

        w, quant_state = bnb_functional.quantize_4bit(w, quant_type="nf4", compress_statistics=True, blocksize=64)
    layer = LoRAWeights(weight=w, quant_state=quant_state, scaling=2.0)
    adapter_dtype = adapter_dtype or dtype
    if rank is not None:
        layer.lora_a = (torch.randn(rank, d_in, generator=gen) / d_in**0.5).to(adapter_dtype).to(DEVICE)
        layer.lora_b = (torch.randn(d_out, rank, generator=gen) * 0.3).to(adapter_dtype).to(DEVICE)
        layer.lora_a.requires_grad_(True)
        layer.lora_b.requires_grad_(True)
    if bias:
        layer.bias = (torch.randn(d_out, generator=gen) * 0.1).to(dtype).to(DEVICE).requires_grad_(True)
    return layer


def clone_layer(layer: LoRAWeights, dtype: torch.dtype | None = None) -> LoRAWeights:
    """Fresh leaves (optionally upcast to ``dtype``; an NF4 base stays packed) with the same values."""

    def fresh(t):
        if t is None:
            return None
        out = t.detach().clone() if dtype is None else t.detach().to(dtype)
        return out.requires_grad_(t.requires_grad)

    weight = layer.weight if layer.quant_state is not None else fresh(layer.weight)
    return LoRAWeights(weight, fresh(layer.lora_a), fresh(layer.lora_b), layer.scaling, fresh(layer.bias),
                       layer.quant_state)


def trainable(layer: LoRAWeights) -> list[tuple[str, torch.Tensor]]:
    return [(n, t) for n, t in (("lora_a", layer.lora_a), ("lora_b", layer.lora_b), ("bias", layer.bias))
            if t is not None and t.requires_grad]
