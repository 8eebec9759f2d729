"""The ``merged`` exporter: LoRA merged into the base, 16-bit sharded safetensors in Hugging Face's
layout (config, generation config, tokenizer with its chat template), loadable by transformers
and vLLM as they are."""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path
from typing import Any
from typing import Literal

import torch
from pydantic import BaseModel
from pydantic import ConfigDict
from pydantic import Field
from pydantic import field_validator

from ftengine.plugins.exporters.merged_tensors import base_source
from ftengine.plugins.exporters.merged_tensors import iter_merged_tensors
from ftengine.plugins.exporters.nf4 import linear_weight_names
from ftengine.plugins.exporters.nf4 import quantization_config
from ftengine.plugins.exporters.nf4 import quantize_tensors

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(B|KB|MB|GB|KIB|MIB|GIB)?\s*$", re.IGNORECASE)
_UNITS = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


def parse_size(text: str | int) -> int:
    """``"5GB"`` -> bytes (decimal units as Hugging Face uses them; ``GiB`` binary)."""
    if isinstance(text, int):
        return text
    match = _SIZE.match(text)
    if not match:
        raise ValueError(f"not a size: {text!r} (expected e.g. '5GB', '500MB')")
    return int(float(match.group(1)) * _UNITS[(match.group(2) or "B").upper()])


class MergedOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    dtype: Literal["bfloat16", "float16", "nf4"] = Field(
        "bfloat16", description="bfloat16 / float16, or nf4: bitsandbytes 4-bit linear layers (requantized after "
        "the merge, lossy; the rest in bfloat16) that transformers loads as a 4-bit model")
    max_shard_size: str = Field("5GB", description="largest safetensors shard")

    @field_validator("max_shard_size")
    @classmethod
    def _valid_size(cls, value: str) -> str:
        parse_size(value)
        return value


class _ShardWriter:
    """Collects tensors into shards of at most ``max_bytes`` and writes each as it fills."""

    def __init__(self, out_dir: Path, max_bytes: int):
        self.out_dir, self.max_bytes = out_dir, max_bytes
        self.current: dict[str, torch.Tensor] = {}
        self.current_bytes = 0
        self.shards: list[list[str]] = []
        self.total_bytes = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        size = tensor.numel() * tensor.element_size()
        if self.current and self.current_bytes + size > self.max_bytes:
            self._flush()
        self.current[name] = tensor.contiguous()
        self.current_bytes += size
        self.total_bytes += size

    def _flush(self) -> None:
        from safetensors.torch import save_file

        index = len(self.shards)
        save_file(self.current, str(self.out_dir / f"shard-{index}.tmp"), metadata={"format": "pt"})
        self.shards.append(list(self.current))
        self.current, self.current_bytes = {}, 0

    def finish(self) -> list[str]:
        if self.current:
            self._flush()
        count = len(self.shards)
        if count == 1:
            (self.out_dir / "shard-0.tmp").rename(self.out_dir / "model.safetensors")
            return ["model.safetensors"]
        weight_map = {}
        names = []
        for i, tensors in enumerate(self.shards):
            name = f"model-{i + 1:05d}-of-{count:05d}.safetensors"
            (self.out_dir / f"shard-{i}.tmp").rename(self.out_dir / name)
            weight_map.update({t: name for t in tensors})
            names.append(name)
        index = {"metadata": {"total_size": self.total_bytes}, "weight_map": weight_map}
        (self.out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
        return names


def _clean_config(model: Any, dtype: torch.dtype) -> Any:
    config = copy.deepcopy(model.config)
    for attr in ("quantization_config", "_pre_quantization_dtype"):
        if hasattr(config, attr):
            delattr(config, attr)
    config.dtype = dtype  # transformers' current key (``torch_dtype`` is deprecated)
    return config


class MergedExporter:
    name = "merged"
    description = "LoRA merged into the base: 16-bit sharded safetensors + config + tokenizer (transformers, vLLM)"
    options_schema = MergedOptions

    def export(self, model: Any, tokenizer: Any, out_dir: Path, options: MergedOptions) -> list[str]:
        nf4 = options.dtype == "nf4"
        dtype = torch.bfloat16 if nf4 else getattr(torch, options.dtype)
        base, original, source = base_source(model)
        writer = _ShardWriter(out_dir, parse_size(options.max_shard_size))
        quantized = linear_weight_names(model) if nf4 else set()
        for name, tensor in iter_merged_tensors(model, torch.float32 if nf4 else dtype, original):
            if name in quantized:
                for part, value in quantize_tensors(name, tensor, dtype):
                    writer.add(part, value)
            else:
                writer.add(name, tensor.to(dtype) if tensor.is_floating_point() else tensor)
        files = writer.finish()
        config = _clean_config(base, dtype)
        if nf4:
            config.quantization_config = quantization_config(dtype)
        config.save_pretrained(str(out_dir))
        generation = getattr(base, "generation_config", None)
        if generation is not None:
            generation = copy.deepcopy(generation)
            text_tokenizer = getattr(tokenizer, "tokenizer", tokenizer)  # a vision-language model's processor
            if text_tokenizer.eos_token_id is not None:
                generation.eos_token_id = text_tokenizer.eos_token_id
            if text_tokenizer.pad_token_id is not None:
                generation.pad_token_id = text_tokenizer.pad_token_id
            generation.save_pretrained(str(out_dir))
        tokenizer.save_pretrained(str(out_dir))
        return [f"{len(files)} safetensors shard(s), {writer.total_bytes / 2**20:.1f} MiB in {options.dtype}",
                f"base weights: {source}"]
