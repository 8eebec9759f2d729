"""The saving methods Unsloth puts on its models, as calls of :func:`ftengine.export` (and of the Hub
upload for the ``push_to_hub_*`` ones)."""

from __future__ import annotations

import os
import tempfile
import types
from pathlib import Path
from typing import Any

import ftengine
from ftengine.compat._arguments import strict
from ftengine.compat.fast_inference import TOKENIZER_ATTR
from ftengine.core.errors import ConfigError
from ftengine.engine import hub

SAVE_METHODS: dict[str, tuple[str, dict[str, Any]]] = {
    "lora": ("lora", {}),
    "merged_16bit": ("merged", {}),
    "merged_4bit": ("merged", {"dtype": "nf4"}),
    "merged_4bit_forced": ("merged", {"dtype": "nf4"}),
}
"""Unsloth's ``save_method`` -> ftengine exporter and options."""
GGUF_ALIASES = {"not_quantized": "f16", "fast_quantized": "q8_0", "quantized": "q4_k_m"}
"""Unsloth's named GGUF choices -> llama.cpp quantization names."""


def _export_options(save_method: str) -> tuple[str, dict[str, Any]]:
    if save_method not in SAVE_METHODS:
        raise ConfigError(f"save_method must be one of {', '.join(SAVE_METHODS)}, got {save_method!r}")
    return SAVE_METHODS[save_method]


def _quantizations(quantization_method: str | list[str]) -> list[str]:
    methods = [quantization_method] if isinstance(quantization_method, str) else list(quantization_method)
    if not methods:
        raise ConfigError("quantization_method: give at least one (e.g. 'q4_k_m')")
    return [GGUF_ALIASES.get(m.lower(), m.lower()) for m in methods]


def _tokenizer(model: Any, tokenizer: Any, method: str) -> Any:
    """``tokenizer``, else the one the loader left on the model (as Unsloth keeps it for these calls)."""
    tokenizer = tokenizer if tokenizer is not None else getattr(model, TOKENIZER_ATTR, None)
    if tokenizer is None:
        raise ConfigError(f"{method}: pass tokenizer= (the export writes the tokenizer and its chat template)")
    return tokenizer


def _base_model(model: Any) -> str | None:
    peft_config = getattr(model, "peft_config", None)
    if peft_config:
        return next(iter(peft_config.values())).base_model_name_or_path
    return getattr(getattr(model, "config", None), "_name_or_path", None)


def write_merged(model: Any, save_directory: str | Path, tokenizer: Any, save_method: str,
                 max_shard_size: str = "5GB") -> Path:
    name, options = _export_options(save_method)
    if name == "merged":
        options = {**options, "max_shard_size": max_shard_size}
    return ftengine.export(model, tokenizer, str(save_directory), format=name, overwrite=True, **options)


def write_gguf(model: Any, save_directory: str | Path, tokenizer: Any, quantization_method: str | list[str]
               ) -> list[Path]:
    """Each quantization's GGUF file into ``save_directory`` (the Modelfile of the first one beside them)."""
    target = Path(save_directory)
    target.mkdir(parents=True, exist_ok=True)
    written = []
    for quantization in _quantizations(quantization_method):
        with tempfile.TemporaryDirectory(dir=target.parent, prefix=".gguf-") as staging:
            out = ftengine.export(model, tokenizer, str(Path(staging) / "gguf"), format="gguf",
                                  quantization=quantization)
            for file in sorted(out.iterdir()):
                destination = target / file.name
                if file.suffix == ".gguf" or not destination.exists():
                    os.replace(file, destination)
                    written.append(destination)
    return written


def _push(model: Any, repo_id: str, token: str | None, private: bool | None, export_format: str,
          details: dict[str, Any], write: Any) -> str:
    hub.check_push(repo_id, token, "push_to_hub")
    with tempfile.TemporaryDirectory(prefix="ftengine-push-") as folder:
        write(Path(folder) / "export")
        card = hub.model_card(repo_id, _base_model(model), export_format, details)
        return hub.push_folder(Path(folder) / "export", repo_id, token, private, card)


@strict
def save_pretrained_merged(self: Any, save_directory: str, tokenizer: Any = None, save_method: str = "merged_16bit",
                           push_to_hub: bool = False, token: str | None = None, private: bool | None = None,
                           max_shard_size: str = "5GB") -> Path | str:
    """``save_method="lora"`` (the adapter), ``"merged_16bit"`` or ``"merged_4bit"`` (the merged model);
    with ``push_to_hub`` the directory name is the Hub repository id. Without ``tokenizer``, the one the
    model was loaded with (its chat template as :func:`get_chat_template` left it)."""
    tokenizer = _tokenizer(self, tokenizer, "save_pretrained_merged")
    if push_to_hub:
        return push_to_hub_merged(self, save_directory, tokenizer, save_method, token, private, max_shard_size)
    return write_merged(self, save_directory, tokenizer, save_method, max_shard_size)


@strict
def push_to_hub_merged(self: Any, repo_id: str, tokenizer: Any = None, save_method: str = "merged_16bit",
                       token: str | None = None, private: bool | None = None, max_shard_size: str = "5GB") -> str:
    """:func:`save_pretrained_merged` into a temporary directory, uploaded to ``repo_id`` with a model card."""
    tokenizer = _tokenizer(self, tokenizer, "push_to_hub_merged")
    name, _ = _export_options(save_method)
    return _push(self, repo_id, token, private, name, {"save_method": save_method},
                 lambda folder: write_merged(self, folder, tokenizer, save_method, max_shard_size))


@strict
def save_pretrained_gguf(self: Any, save_directory: str, tokenizer: Any = None,
                         quantization_method: str | list[str] = "fast_quantized", push_to_hub: bool = False,
                         token: str | None = None, private: bool | None = None,
                         quantization_type: str | list[str] | None = None) -> list[Path] | str:
    """One GGUF file per quantization (``"q4_k_m"``, a list, or ``not_quantized`` / ``fast_quantized`` /
    ``quantized``; ``quantization_type="Q8_0"`` is ``FastModel``'s name for it) and an Ollama Modelfile.
    Without ``tokenizer``, the one the model was loaded with."""
    tokenizer = _tokenizer(self, tokenizer, "save_pretrained_gguf")
    quantization_method = quantization_type or quantization_method
    if push_to_hub:
        return push_to_hub_gguf(self, save_directory, tokenizer, quantization_method, token, private)
    return write_gguf(self, save_directory, tokenizer, quantization_method)


@strict
def push_to_hub_gguf(self: Any, repo_id: str, tokenizer: Any = None,
                     quantization_method: str | list[str] = "fast_quantized", token: str | None = None,
                     private: bool | None = None, quantization_type: str | list[str] | None = None) -> str:
    """:func:`save_pretrained_gguf` into a temporary directory, uploaded to ``repo_id`` with a model card."""
    tokenizer = _tokenizer(self, tokenizer, "push_to_hub_gguf")
    quantization_method = quantization_type or quantization_method
    details = {"quantization": ", ".join(_quantizations(quantization_method))}
    return _push(self, repo_id, token, private, "gguf", details,
                 lambda folder: write_gguf(self, folder, tokenizer, quantization_method))


METHODS = (save_pretrained_merged, push_to_hub_merged, save_pretrained_gguf, push_to_hub_gguf)


def attach_saving_methods(model: Any) -> Any:
    """Bind the saving methods to ``model`` (as Unsloth's loader does to the models it returns)."""
    for method in METHODS:
        setattr(model, method.__name__, types.MethodType(method, model))
    return model
