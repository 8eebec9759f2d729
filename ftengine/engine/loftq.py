"""LoftQ initialisation of LoRA adapters (Li et al., 2023, "LoftQ: LoRA-Fine-Tuning-Aware Quantization").

Each adapted weight ``W`` is split into a quantized part and a low-rank part: alternately
``Q = dequant(quant(W - B A))`` and ``B A = the best rank-r approximation of W - Q`` (truncated SVD). The base
layer then holds ``Q`` (the weights a 4-bit or 8-bit load of the saved base gives) and the adapter starts at
``B A``, so the adapted model starts close to the unquantized one instead of at the quantized one.

peft's own LoftQ initialisation (``init_lora_weights="loftq"``) computes on CUDA only and needs scipy; this
one runs where the weights are (CPU included) with the same quantizers (bitsandbytes' NF4 with 64-element
blocks, or its row-wise int8), and it divides by the adapter's scaling so that ``scaling * B @ A`` (what the
forward adds) is the low-rank part whatever ``lora_alpha`` is. The peft config records
``init_lora_weights="loftq"`` and the ``loftq_config``, as peft writes them.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import torch

from ftengine.core.errors import ConfigError

QUANTIZED_LAYERS = ("Linear4bit", "Linear8bitLt")


def requested(lora: Any) -> bool:
    """Whether the LoRA settings ask for LoftQ.

    Raises:
        ConfigError: a ``loftq_config`` without ``init_lora_weights="loftq"`` (peft would ignore it), or
            LoftQ with DoRA (whose magnitudes are taken from the unquantized weights).
    """
    if lora.init_lora_weights != "loftq":
        if lora.loftq_config is not None:
            raise ConfigError("loftq_config is used only with init_lora_weights='loftq'")
        return False
    if lora.use_dora:
        raise ConfigError("init_lora_weights='loftq' and use_dora are exclusive")
    return True


def as_dict(loftq_config: Any) -> Any:
    """peft's ``LoftQConfig`` (a dataclass) as the ``loftq_config`` mapping; anything else as given."""
    if dataclasses.is_dataclass(loftq_config) and not isinstance(loftq_config, type):
        return dataclasses.asdict(loftq_config)
    return loftq_config


def check_unquantized(model: Any) -> None:
    """peft's rule: LoftQ starts from the 16/32-bit weights, which a 4-bit or 8-bit load has already lost.

    Raises:
        ConfigError: ``model`` holds bitsandbytes-quantized layers.
    """
    if any(type(m).__name__ in QUANTIZED_LAYERS for m in model.modules()):
        raise ConfigError("init_lora_weights='loftq' needs an unquantized base (it quantizes the weights itself): "
                          "load the model without load_in_4bit / load_in_8bit")


def quantize_roundtrip(weight: torch.Tensor, bits: int) -> torch.Tensor:
    """``dequant(quant(weight))`` in float32: NF4 in blocks of 64 (bits 4) or row-wise absmax int8 (bits 8),
    bitsandbytes' formats as ``load_in_4bit`` / ``load_in_8bit`` store them."""
    import bitsandbytes.functional as bnbf

    weight = weight.float().contiguous()
    if bits == 4:
        packed, state = bnbf.quantize_4bit(weight, blocksize=64, quant_type="nf4", compress_statistics=False)
        return bnbf.dequantize_4bit(packed, state).float()
    if bits == 8:
        codes, row_scale, _ = bnbf.int8_vectorwise_quant(weight)
        return bnbf.int8_vectorwise_dequant(codes, row_scale).float()
    raise ConfigError(f"lora.loftq_config.loftq_bits: expected 4 or 8, got {bits}")


@torch.no_grad()
def loftq_factors(weight: torch.Tensor, bits: int, rank: int, iterations: int, scaling: float
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The quantized base ``Q`` (out, in) and adapter factors ``A`` (rank, in), ``B`` (out, rank) with
    ``Q + scaling * B @ A`` close to ``weight``.

    ``A`` and ``B`` share the singular values evenly (``B = U sqrt(S)``, ``A = sqrt(S) Vh``), each divided by
    ``sqrt(scaling)``.
    """
    target = weight.float()
    low_rank = torch.zeros_like(target)
    for _ in range(iterations):
        quantized = quantize_roundtrip(target - low_rank, bits)
        u, s, vh = torch.linalg.svd(target - quantized, full_matrices=False)
        root = (s[:rank] / scaling).sqrt()
        b, a = u[:, :rank] * root, root[:, None] * vh[:rank]  # (out, r), (r, in)
        low_rank = scaling * b @ a
    return quantized, a, b


def initialise(model: Any, bits: int = 4, iterations: int = 1, adapters: bool = True) -> str:
    """LoftQ-initialise every LoRA layer of the peft ``model`` (its active adapter); returns a run note.

    Args:
        adapters: also set the adapters' factors; ``False`` quantizes the base weights alone (for adapters
            loaded from a file: the computation is deterministic, so the base is the one they trained on).

    Raises:
        ConfigError: a LoRA layer whose base is not a plain ``nn.Linear`` (embeddings, fused expert
            parameters, quantized layers).
    """
    from peft.tuners.lora import LoraLayer

    adapter = model.active_adapter
    layers = 0
    for name, module in model.named_modules():
        if not isinstance(module, LoraLayer) or adapter not in module.lora_A:
            continue
        base = module.get_base_layer()
        if type(base) is not torch.nn.Linear:
            raise ConfigError(f"init_lora_weights='loftq': {name} wraps a {type(base).__name__}; LoftQ initialises "
                              f"Linear layers only (target the projections)")
        quantized, a, b = loftq_factors(base.weight, bits, module.r[adapter], iterations, module.scaling[adapter])
        base.weight.data = quantized.to(base.weight.dtype)
        if adapters:
            module.lora_A[adapter].weight.data = a.to(module.lora_A[adapter].weight.dtype)
            module.lora_B[adapter].weight.data = b.to(module.lora_B[adapter].weight.dtype)
        layers += 1
    config = model.peft_config[adapter]
    config.init_lora_weights = "loftq"
    config.loftq_config = {"loftq_bits": bits, "loftq_iter": iterations}
    kind = "NF4" if bits == 4 else "int8"
    return f"LoftQ: {layers} layers' base weights quantized to {kind} and compensated by their adapters " \
           f"({iterations} iteration{'s' * (iterations != 1)})"


def load_adapter(model: Any, adapter_dir: str | Path, is_trainable: bool = False) -> Any:
    """``PeftModel.from_pretrained(model, adapter_dir)``; a LoftQ adapter (``init_lora_weights: "loftq"`` in its
    config) goes on the base it trained with: the base's adapted weights quantized as :func:`initialise`
    did, instead of peft's own LoftQ initialisation (CUDA and scipy only) before the saved factors load."""
    from peft import PeftConfig
    from peft import PeftModel

    raw = json.loads((Path(adapter_dir) / "adapter_config.json").read_text())
    if raw.get("init_lora_weights") != "loftq":
        return PeftModel.from_pretrained(model, str(adapter_dir), is_trainable=is_trainable)
    settings = raw.get("loftq_config") or {}
    config = PeftConfig.from_peft_type(**{**raw, "init_lora_weights": True, "loftq_config": {}})
    peft_model = PeftModel.from_pretrained(model, str(adapter_dir), config=config, is_trainable=is_trainable)
    initialise(peft_model, settings.get("loftq_bits", 4), settings.get("loftq_iter", 1), adapters=False)
    return peft_model
