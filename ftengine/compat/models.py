"""``FastLanguageModel`` / ``FastModel``: Unsloth's loader names over :func:`ftengine.load_model` and
:func:`ftengine.add_lora`."""

from __future__ import annotations

import contextlib
import dataclasses
import os
from collections.abc import Iterator
from typing import Any

import torch

import ftengine
from ftengine.compat._arguments import strict
from ftengine.compat.fast_inference import TOKENIZER_ATTR
from ftengine.compat.fast_inference import attach_inference_methods
from ftengine.compat.saving import attach_saving_methods
from ftengine.core.errors import ConfigError
from ftengine.engine import static_decode
from ftengine.engine.settings import remember_settings
from ftengine.engine.settings import settings_of

SINGLE_DEVICE_MAPS = (None, "sequential", "auto", "cuda", "cuda:0", {"": 0})
"""``device_map`` values meaning what ftengine does anyway: the whole model on the one GPU (or the CPU)."""
CHECKPOINTING = {True: True, False: False, "unsloth": "offload", "offload": "offload", "auto": "auto"}


def is_bf16_supported() -> bool:
    """Whether the CUDA GPU computes in bfloat16 (False on the CPU)."""
    return torch.cuda.is_available() and torch.cuda.is_bf16_supported()


@contextlib.contextmanager
def _hub_token(token: str | None) -> Iterator[None]:
    """``token`` as the Hugging Face token while the model downloads (huggingface_hub reads ``HF_TOKEN``)."""
    if token is None:
        yield
        return
    previous = os.environ.get("HF_TOKEN")
    os.environ["HF_TOKEN"] = token
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop("HF_TOKEN", None)
        else:
            os.environ["HF_TOKEN"] = previous


def _checkpointing(mode: Any, where: str) -> None:
    if mode not in CHECKPOINTING:
        raise ConfigError(f"{where}: use_gradient_checkpointing must be True, False, 'unsloth', 'offload' or 'auto', "
                          f"got {mode!r}")


class FastLanguageModel:
    """Unsloth's ``FastLanguageModel``: ``from_pretrained``, ``get_peft_model``, ``for_inference`` and
    ``for_training``, each a call of ftengine's Python API; the models it returns carry
    ``save_pretrained_merged``, ``save_pretrained_gguf``, ``push_to_hub_merged`` and ``push_to_hub_gguf``, and
    the GRPO notebooks' ``save_lora``, ``load_lora`` and ``fast_generate`` (:mod:`ftengine.compat.fast_inference`)."""

    @staticmethod
    @strict
    def from_pretrained(model_name: str, max_seq_length: int = 2048, dtype: Any = None, load_in_4bit: bool = True,
                        load_in_8bit: bool = False, full_finetuning: bool = False, token: str | None = None,
                        device_map: Any = "sequential", rope_scaling: dict[str, Any] | None = None,
                        trust_remote_code: bool = False, fix_tokenizer: bool = True,
                        attn_implementation: str = "auto", use_gradient_checkpointing: bool | str = "unsloth",
                        fast_inference: bool = False, max_lora_rank: int | None = None,
                        gpu_memory_utilization: float | None = None) -> tuple[Any, Any]:
        """:func:`ftengine.load_model` (patched with the kernel ops), the QLoRA default included; a
        vision-language model comes with its processor in the tokenizer's place.

        Args:
            model_name: local Hugging Face directory or hub id.
            dtype: ``None`` (the device's best), ``torch.bfloat16``, ``torch.float16`` or ``torch.float32``.
            token: Hugging Face token for gated or private models.
            device_map: ftengine places the whole model on the GPU (or the CPU); only the values that
                mean that are taken.
            rope_scaling: transformers' ``rope_scaling`` dict (``{"rope_type": "yarn", "factor": 4.0, ...}``),
                as :func:`ftengine.load_model` takes it.
            fix_tokenizer: a pad token is always set (the EOS when the tokenizer has none).
            use_gradient_checkpointing: checked here; :meth:`get_peft_model`'s argument sets the mode.
            fast_inference: Unsloth's switch for a colocated vLLM engine (GRPO notebooks set it, with
                ``max_lora_rank`` and ``gpu_memory_utilization`` sizing that engine): ftengine samples with its
                own static-cache decoder either way (``model.fast_generate`` included), so the three are
                accepted and change nothing.

        Raises:
            ConfigError: an unknown argument (with a did-you-mean), or a value ftengine does not support.
        """
        if not any(device_map == value for value in SINGLE_DEVICE_MAPS):
            raise ConfigError(f"FastLanguageModel.from_pretrained: device_map={device_map!r} is not supported; "
                              f"ftengine puts the whole model on one GPU (use 'sequential', 'auto' or None)")
        _checkpointing(use_gradient_checkpointing, "FastLanguageModel.from_pretrained")
        if full_finetuning:
            load_in_4bit = load_in_8bit = False
        with _hub_token(token):
            model, tokenizer = ftengine.load_model(
                model_name, max_seq_length=max_seq_length, dtype=dtype, load_in_4bit=load_in_4bit,
                load_in_8bit=load_in_8bit, full_finetuning=full_finetuning, trust_remote_code=trust_remote_code,
                attn_implementation=attn_implementation, rope_scaling=rope_scaling)
        attach_saving_methods(model)
        attach_inference_methods(model, tokenizer)
        return model, tokenizer

    @staticmethod
    @strict
    def get_peft_model(model: Any, r: int = 16, target_modules: str | list[str] = "all-linear",
                       lora_alpha: float = 16, lora_dropout: float = 0.0, bias: str = "none",
                       use_gradient_checkpointing: bool | str = "unsloth", random_state: int = 3407,
                       use_rslora: bool = False, loftq_config: dict[str, Any] | None = None,
                       max_seq_length: int | None = None, modules_to_save: list[str] | None = None,
                       init_lora_weights: bool | str = True, finetune_vision_layers: bool = True,
                       finetune_language_layers: bool = True, finetune_attention_modules: bool = True,
                       finetune_mlp_modules: bool = True) -> Any:
        """:func:`ftengine.add_lora`; ``use_gradient_checkpointing="unsloth"`` is ftengine's ``"offload"``.
        ``init_lora_weights="loftq"`` with ``loftq_config`` (peft's ``LoftQConfig``, default 4 bits and one
        iteration) LoftQ-initialises the adapters of an unquantized base (``load_in_4bit=False``). The
        ``finetune_*`` switches pick the towers and projections of a vision-language model (with
        ``target_modules="all-linear"``); a text model has one tower and ignores them.

        Raises:
            ConfigError: an unknown argument, a ``loftq_config`` without ``init_lora_weights="loftq"``, LoftQ
                on a 4-bit or 8-bit base, or an unknown checkpointing mode.
        """
        _checkpointing(use_gradient_checkpointing, "FastLanguageModel.get_peft_model")
        if max_seq_length is not None:
            remember_settings(model, dataclasses.replace(settings_of(model), max_seq_length=max_seq_length))
        peft_model = ftengine.add_lora(
            model, r=r, lora_alpha=lora_alpha, lora_dropout=lora_dropout, target_modules=target_modules,
            use_gradient_checkpointing=CHECKPOINTING[use_gradient_checkpointing], random_state=random_state,
            bias=bias, use_rslora=use_rslora, modules_to_save=modules_to_save, init_lora_weights=init_lora_weights,
            loftq_config=loftq_config or None, finetune_vision_layers=finetune_vision_layers,
            finetune_language_layers=finetune_language_layers, finetune_attention_modules=finetune_attention_modules,
            finetune_mlp_modules=finetune_mlp_modules)
        attach_saving_methods(peft_model)
        attach_inference_methods(peft_model, getattr(model, TOKENIZER_ATTR, None))
        return peft_model

    @staticmethod
    @strict
    def for_inference(model: Any) -> Any:
        """Eval mode with the KV cache on, and ``model.generate`` sampling as :func:`ftengine.generate` does
        (a preallocated KV cache, each token's step replayed from a CUDA graph on a GPU) wherever it can,
        transformers' ``generate`` otherwise (:mod:`ftengine.engine.static_decode`)."""
        model.eval()
        model.config.use_cache = True
        if static_decode.unsupported(model) is None:
            static_decode.route_generate(model)
        return model

    @staticmethod
    @strict
    def for_training(model: Any) -> Any:
        """Back to train mode after :meth:`for_inference` (checkpointing stays as ``get_peft_model`` set it)."""
        model.train()
        model.config.use_cache = False
        return model


class FastModel(FastLanguageModel):
    """Unsloth's newer name for the same loader."""


class FastVisionModel(FastModel):
    """Unsloth's loader for vision-language models (Qwen2-VL, Qwen2.5-VL, Gemma 3, Llama 3.2 Vision):
    ``from_pretrained`` returns ``(model, processor)``; ``get_peft_model`` takes ``finetune_vision_layers``,
    ``finetune_language_layers``, ``finetune_attention_modules`` and ``finetune_mlp_modules``."""
