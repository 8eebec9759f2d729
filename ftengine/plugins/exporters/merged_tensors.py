"""LoRA merged into the base weights, one tensor at a time, in Hugging Face checkpoint names.

Every exporter that writes full weights (``merged``, ``gguf``) reads them from here, so a model of
any size is merged with the peak memory of one tensor, and the trained in-memory model is left
untouched (no ``merge_and_unload`` on it).

For a quantized run (QLoRA / 8-bit) the base weights are, when the original 16-bit checkpoint is
on disk, read tensor by tensor from it instead of being dequantized, so no 4-bit rounding is baked
into the merged weights.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn

from ftengine.core.kernels import NF4_EXPERTS_ATTR
from ftengine.core.kernels import get_op

_ADAPTER_SUFFIXES = ("lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B", "lora_magnitude_vector",
                     "lora_dropout")


class OriginalCheckpoint:
    """Lazy access to the 16-bit safetensors of a local Hugging Face model directory."""

    def __init__(self, directory: Path):
        from safetensors import safe_open

        self.directory = directory
        index = directory / "model.safetensors.index.json"
        if index.exists():
            weight_map = json.loads(index.read_text())["weight_map"]
        else:
            files = sorted(directory.glob("*.safetensors"))
            weight_map = {}
            for file in files:
                with safe_open(str(file), framework="pt") as f:
                    weight_map.update({k: file.name for k in f.keys()})
        self.weight_map: dict[str, str] = weight_map
        self._open = safe_open

    @classmethod
    def find(cls, model: nn.Module) -> OriginalCheckpoint | None:
        """The checkpoint ``model`` was loaded from, if it is a local directory of 16-bit safetensors."""
        path = Path(str(getattr(model.config, "_name_or_path", "") or ""))
        if not path.is_dir() or not any(path.glob("*.safetensors")):
            return None
        checkpoint = cls(path)
        return checkpoint if checkpoint.is_16bit() else None

    def is_16bit(self) -> bool:
        for name, file in self.weight_map.items():
            if name.endswith(".weight"):
                with self._open(str(self.directory / file), framework="pt") as f:
                    return f.get_slice(name).get_dtype() in ("F16", "BF16", "F32")
        return False

    def get(self, name: str) -> torch.Tensor | None:
        file = self.weight_map.get(name)
        if file is None:
            return None
        with self._open(str(self.directory / file), framework="pt") as f:
            return f.get_tensor(name)


def is_quantized(model: nn.Module) -> bool:
    """Whether the model's base weights are bitsandbytes 4-bit or 8-bit."""
    return bool(getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False)
                or getattr(getattr(model, "config", None), "quantization_config", None))


def base_source(model: nn.Module) -> tuple[nn.Module, OriginalCheckpoint | None, str]:
    """Where merged weights take their base from: ``(base_model, original_checkpoint, description)``.

    A quantized base is read from its original 16-bit checkpoint when one is on disk (``None``
    otherwise: the base is dequantized); ``description`` is the line exporters put in the summary.
    """
    base = _unwrap(model)
    if not is_quantized(base):
        return base, None, "in-memory 16-bit base weights"
    original = OriginalCheckpoint.find(base)
    if original is not None:
        return base, original, f"original 16-bit checkpoint {original.directory} (read tensor by tensor)"
    return base, None, "dequantized quantized base (no original 16-bit checkpoint found)"


def _dense_weight(module: nn.Module) -> torch.Tensor:
    """A linear layer's weight as a dense float tensor, dequantizing bitsandbytes layers."""
    weight = module.weight
    if weight.dtype in (torch.uint8, torch.int8) or type(weight).__name__ in ("Params4bit", "Int8Params"):
        from peft.utils.integrations import dequantize_module_weight

        return dequantize_module_weight(module).float()
    return weight.detach().float()


def _dense_parameter(module: nn.Module, pname: str, param: torch.Tensor) -> torch.Tensor:
    """A module's parameter as a float tensor: NF4-stored experts (``NF4_EXPERTS_ATTR``) dequantized."""
    stored = module.__dict__.get(NF4_EXPERTS_ATTR, {}).get(pname)
    if stored is None:
        return param.detach().float()
    return get_op("dequantize_nf4")(*stored).float()


def _lora_merged_weight(layer: nn.Module, base: torch.Tensor) -> torch.Tensor:
    """``W + sum of the active adapters' deltas`` (DoRA: rescaled to its magnitude vector)."""
    merged = base.float()
    if getattr(layer, "merged", False):
        return merged
    for adapter in layer.active_adapters:
        if adapter not in getattr(layer, "lora_A", {}) and adapter not in getattr(layer, "lora_embedding_A", {}):
            continue
        delta = layer.get_delta_weight(adapter).float().to(merged.device)
        magnitude = getattr(layer, "lora_magnitude_vector", {})
        if adapter in magnitude:
            # DoRA: W' = m * (W + dW) / ||W + dW||, the norm taken over each output row.
            combined = merged + delta
            norm = combined.norm(p=2, dim=1, keepdim=True)
            merged = magnitude[adapter].weight.float().reshape(-1, 1) * combined / norm
        else:
            merged = merged + delta
    return merged


def _merged_parameters(wrapper: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """The parameters of a module peft adapts through ``target_parameters`` (fused MoE experts, a router),
    each plus the deltas of the ``ParamWrapper`` s nested around it (one wrapper per adapted parameter)."""
    wrappers = {}
    module = wrapper
    while type(module).__name__ == "ParamWrapper":
        wrappers[module.parameter_name] = module
        module = module.base_layer
    for pname, param in module.named_parameters():
        merged = _dense_parameter(module, pname, param)
        layer = wrappers.get(pname)
        if layer is not None and not layer.merged:
            for adapter in layer.active_adapters:
                if adapter in layer.lora_A:
                    merged = merged + layer.get_delta_weight(adapter).float().to(merged.device)
        yield pname, merged


def checkpoint_layer_name(module_name: str) -> str | None:
    """The checkpoint name of a layer from its module name inside a (peft) model, or ``None`` for
    adapter-internal layers (LoRA matrices, the frozen copy of a fully trained module)."""
    parts = module_name.split(".")
    if any(p.startswith("lora_") for p in parts) or "original_module" in parts:
        return None
    if "modules_to_save" in parts:
        i = parts.index("modules_to_save")
        parts = parts[:i] + parts[i + 2 :]
    return ".".join(p for p in parts if p != "base_layer")


def _unwrap(model: nn.Module) -> nn.Module:
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def iter_merged_tensors(
    model: nn.Module,
    dtype: torch.dtype = torch.bfloat16,
    original: OriginalCheckpoint | None = None,
) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield ``(hf_name, tensor)`` for every weight of the merged model, one at a time, on the CPU.

    Args:
        model: a peft model (LoRA adapters merged into their base layers) or a plain model.
        dtype: the dtype of floating-point outputs.
        original: base weights to use instead of the in-memory ones (the 16-bit checkpoint of a
            quantized run); missing names fall back to the in-memory (dequantized) weights.

    Tied weights are yielded once (the first name, as in Hugging Face checkpoints).

    .. versionadded:: 0.1
    """
    from peft.tuners.lora import LoraLayer
    from peft.utils import ModulesToSaveWrapper

    base_model = _unwrap(model)
    handled: list[str] = []
    seen: set[int] = set()

    def base_tensor(name: str, fallback: torch.Tensor) -> torch.Tensor:
        if original is not None:
            tensor = original.get(name)
            if tensor is not None:
                return tensor.float()
        return fallback

    def out(tensor: torch.Tensor) -> torch.Tensor:
        tensor = tensor.detach().to("cpu")
        return tensor.to(dtype) if tensor.is_floating_point() else tensor

    for module_name, module in base_model.named_modules():
        if any(module_name.startswith(prefix + ".") for prefix in handled):
            continue
        prefix = f"{module_name}." if module_name else ""
        if type(module).__name__ == "ParamWrapper":
            handled.append(module_name)
            for pname, tensor in _merged_parameters(module):
                yield f"{prefix}{pname}", out(tensor)
            continue
        if isinstance(module, LoraLayer):
            handled.append(module_name)
            base = module.get_base_layer()
            weight_name = f"{prefix}weight"
            yield weight_name, out(_lora_merged_weight(module, base_tensor(weight_name, _dense_weight(base))))
            if getattr(base, "bias", None) is not None:
                yield f"{prefix}bias", out(base_tensor(f"{prefix}bias", base.bias.detach().float()))
            continue
        if isinstance(module, ModulesToSaveWrapper):
            handled.append(module_name)
            trained = module.modules_to_save[module.active_adapters[0]]
            for pname, param in trained.named_parameters():
                yield f"{prefix}{pname}", out(param)
            continue
        persistent = [(n, b) for n, b in module.named_buffers(recurse=False)
                      if n not in module._non_persistent_buffers_set]
        for pname, tensor in list(module.named_parameters(recurse=False)) + persistent:
            if tensor.data_ptr() in seen:
                continue
            seen.add(tensor.data_ptr())
            if pname == "weight" and (tensor.dtype in (torch.uint8, torch.int8)):
                tensor = _dense_weight(module)
            elif NF4_EXPERTS_ATTR in module.__dict__:
                tensor = _dense_parameter(module, pname, tensor)
            yield f"{prefix}{pname}", out(base_tensor(f"{prefix}{pname}", tensor))
