"""The vLLM-shaped inference Unsloth's GRPO notebooks end with: ``model.save_lora(path)``,
``model.load_lora(path)`` and ``model.fast_generate(texts, sampling_params=..., lora_request=...)``.

Unsloth serves these from a colocated vLLM engine holding the base weights: a call without a
``lora_request`` answers with the base model, one with a saved adapter answers with that adapter.
ftengine keeps those meanings and samples with its own decoder (:func:`ftengine.engine.generation`'s
static-cache path on the patched model): no vLLM is needed, and :class:`SamplingParams` here takes
vLLM's names for the notebooks' ``from vllm import SamplingParams``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import types
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

import ftengine
from ftengine.compat._arguments import strict
from ftengine.core.errors import ConfigError
from ftengine.engine import generation

TOKENIZER_ATTR = "ftengine_compat_tokenizer"
"""Where the loader leaves the tokenizer on the model: vLLM's ``fast_generate`` takes texts, not ids."""


@dataclass
class SamplingParams:
    """vLLM's sampling parameters ftengine's decoder follows (vLLM's names and defaults).

    Args:
        n: completions per prompt.
        temperature: 0 for greedy decoding.
        top_k: ``-1`` or ``0`` keeps every token.
        max_tokens: the most new tokens per completion.
        seed: seeds the sampling of the call.
        stop: strings that end a completion (cut before them, as vLLM does).
    """

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    max_tokens: int = 16
    seed: int | None = None
    stop: list[str] | str | None = None

    def __post_init__(self) -> None:
        if self.n < 1 or self.max_tokens < 1:
            raise ConfigError(f"SamplingParams: n and max_tokens must be at least 1, got n={self.n}, "
                              f"max_tokens={self.max_tokens}")


SamplingParams.__init__ = strict(SamplingParams.__init__)  # type: ignore[method-assign]  (a did-you-mean)


@dataclass(frozen=True)
class LoRARequest:
    """vLLM's handle on a saved adapter, as ``model.load_lora`` returns it."""

    lora_name: str
    lora_int_id: int
    lora_path: str


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    finish_reason: str


@dataclass
class RequestOutput:
    """One prompt's answers, shaped as vLLM's (``outputs[0].text``)."""

    prompt: str
    outputs: list[CompletionOutput]


def _sampling(params: Any) -> SamplingParams:
    """Ours as is; vLLM's own object (or another with its attribute names) read field by field."""
    if params is None:
        return SamplingParams()
    if isinstance(params, SamplingParams):
        return params
    if isinstance(params, dict):
        return SamplingParams(**params)
    fields = {f.name: getattr(params, f.name) for f in dataclasses.fields(SamplingParams) if hasattr(params, f.name)}
    return SamplingParams(**fields)


def save_lora(self: Any, save_directory: str) -> Path:
    """The adapter (``adapter_config.json`` + ``adapter_model.safetensors``) into ``save_directory``,
    through the ``lora`` exporter (non-finite weights refused, written atomically).

    Raises:
        ConfigError: the model has no adapters.
    """
    from peft import PeftModel

    if not isinstance(self, PeftModel):
        raise ConfigError("save_lora: the model has no LoRA adapters (add them with FastLanguageModel.get_peft_model; "
                          "save a fully fine-tuned model with save_pretrained_merged)")
    return ftengine.export(self, None, save_directory, format="lora", overwrite=True)


def load_lora(self: Any, save_directory: str, load_tensors: bool = False) -> LoRARequest:
    """A handle on an adapter :func:`save_lora` (or peft) wrote, for ``fast_generate(lora_request=)``;
    the weights are read when a generation uses them (``load_tensors`` changes nothing).

    Raises:
        ConfigError: the directory holds no peft adapter.
    """
    path = Path(save_directory)
    config = path / "adapter_config.json"
    if not config.is_file():
        raise ConfigError(f"load_lora: {path} holds no adapter_config.json; save the adapter with "
                          f"model.save_lora({str(path)!r}) first")
    try:
        json.loads(config.read_text())
    except (ValueError, UnicodeDecodeError) as exc:
        raise ConfigError(f"load_lora: {config} is not a peft adapter config ({exc})") from None
    number = zlib.crc32(str(path.resolve()).encode()) % 2**31
    return LoRARequest(str(number), number, str(path))


@contextlib.contextmanager
def _adapter(model: Any, request: LoRARequest | None) -> Iterator[None]:
    """The weights a request names: the base model for ``None`` (the adapters off), else the saved
    adapter loaded beside the trained one, active for the call and removed afterwards."""
    from peft import PeftModel

    if not isinstance(model, PeftModel):
        if request is not None:
            raise ConfigError("fast_generate: lora_request needs a LoRA model (FastLanguageModel.get_peft_model)")
        yield
        return
    if request is None:
        with model.disable_adapter():
            yield
        return
    trained = model.active_adapter
    name = f"lora_request_{request.lora_int_id}"
    model.load_adapter(request.lora_path, adapter_name=name, is_trainable=False)
    try:
        model.set_adapter(name)
        yield
    finally:
        model.set_adapter(trained)
        model.delete_adapter(name)


def _finished(text: str, ended: bool, params: SamplingParams) -> tuple[str, str]:
    """``(text, finish_reason)``: cut before the first stop string, if any."""
    stops = [params.stop] if isinstance(params.stop, str) else list(params.stop or [])
    cuts = [text.index(s) for s in stops if s and s in text]
    if cuts:
        return text[:min(cuts)], "stop"
    return text, "stop" if ended else "length"


def fast_generate(self: Any, prompts: str | list[str], sampling_params: Any = None,
                  lora_request: LoRARequest | None = None, use_tqdm: bool = False) -> list[RequestOutput]:
    """Completions of prompt texts (already chat-templated, as the notebooks pass them), one
    :class:`RequestOutput` per prompt with ``sampling_params.n`` completions each.

    Args:
        sampling_params: :class:`SamplingParams`, vLLM's own, or a dict of their fields.
        lora_request: ``model.load_lora(path)`` to answer with that saved adapter; ``None`` answers with
            the base model, as Unsloth's vLLM engine does.
        use_tqdm: vLLM's progress bar switch (no bar is drawn).

    Raises:
        ConfigError: a model not loaded with ``FastLanguageModel.from_pretrained`` (no tokenizer to read the
            texts with), or a ``lora_request`` for a model without adapters.
    """
    tokenizer = getattr(self, TOKENIZER_ATTR, None)
    tokenizer = getattr(tokenizer, "tokenizer", tokenizer)  # a vision model's processor: texts need its tokenizer
    if tokenizer is None:
        raise ConfigError("fast_generate: load the model with FastLanguageModel.from_pretrained (it keeps the "
                          "tokenizer the prompts are read with)")
    params = _sampling(sampling_params)
    texts = [prompts] if isinstance(prompts, str) else list(prompts)
    sampling = generation.Sampling(params.max_tokens, params.temperature, params.top_p, params.min_p,
                                   top_k=max(params.top_k, 0))
    if params.seed is not None:
        torch.manual_seed(params.seed)
    with _adapter(self, lora_request):
        new = generation.completion_ids(self, tokenizer, [t for t in texts for _ in range(params.n)], sampling)
    ends = {tokenizer.eos_token_id, tokenizer.pad_token_id} - {None}
    results = []
    for i, text in enumerate(texts):
        completions = []
        for j, ids in enumerate(new[i * params.n:(i + 1) * params.n].tolist()):
            ended = next((k for k, token in enumerate(ids) if token in ends), None)
            ids = ids if ended is None else ids[:ended]
            answer, reason = _finished(tokenizer.decode(ids, skip_special_tokens=True), ended is not None, params)
            completions.append(CompletionOutput(j, answer, ids, reason))
        results.append(RequestOutput(text, completions))
    return results


METHODS = (save_lora, load_lora, fast_generate)


def attach_inference_methods(model: Any, tokenizer: Any) -> Any:
    """Bind ``save_lora``, ``load_lora`` and ``fast_generate`` to ``model``, with the tokenizer they read
    and write texts with."""
    setattr(model, TOKENIZER_ATTR, tokenizer)
    for method in METHODS:
        setattr(model, method.__name__, types.MethodType(method, model))
    return model
