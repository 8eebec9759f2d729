"""Pieces the benchmark scripts share: the same LoRA and checkpointing on every framework, random text."""

from __future__ import annotations

import random
from typing import Any

LORA = dict(r=16, lora_alpha=16, lora_dropout=0.0)
"""PEFT's LoRA every benchmark trains (fp32 adapters, as PEFT makes them)."""


def attach_lora(model: Any, framework: str, target_modules: list[str], adapter: Any = None,
                task_type: str | None = "CAUSAL_LM") -> tuple[Any, list, str]:
    """``(peft model, patch lines, checkpointing)``: :data:`LORA` on ``target_modules`` and every decoder layer
    checkpointed.

    ``ftengine`` frameworks patch the model with its adapter first (``adapter``, else the one serving its
    ``model_type``) and checkpoint with ftengine's mode named after the dash (``ftengine-offload``: offload;
    none: standard); the others use transformers' non-reentrant checkpointing.
    """
    from peft import LoraConfig
    from peft import get_peft_model

    patched: list = []
    ours = framework.startswith("ftengine")
    if ours:
        from ftengine.core.kernels import get_op
        from ftengine.core.plugins import adapter_for_model_type

        patched = (adapter or adapter_for_model_type(model.config.model_type)).patch(model, get_op)
    model = get_peft_model(model, LoraConfig(**LORA, target_modules=target_modules, task_type=task_type))
    if ours:
        from ftengine.engine.memory.checkpointing import apply_gradient_checkpointing

        checkpointing = apply_gradient_checkpointing(model, framework.partition("-")[2] or True)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
        checkpointing = "standard (non-reentrant), transformers' own"
    model.train()
    return model, patched, checkpointing


def random_text(tokenizer: Any, n_tokens: int, rng: random.Random) -> str:
    """Random lowercase words of about ``n_tokens`` tokens (trimmed to exactly that many)."""
    words: list[str] = []
    while len(tokenizer(" ".join(words), add_special_tokens=False)["input_ids"]) < n_tokens:
        words += ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(2, 8)))
                  for _ in range(max(1, n_tokens // 4))]
    ids = tokenizer(" ".join(words), add_special_tokens=False)["input_ids"][:n_tokens]
    return tokenizer.decode(ids)


def kernel_times(prof: Any) -> dict[str, tuple[float, int]]:
    """``{kernel name: (GPU seconds, launches)}`` of a finished ``torch.profiler`` run: the kernels themselves, not
    the CPU ops that launched them nor the GPU-side spans of annotated ranges (``Optimizer.step#AdamW.step``
    spans the optimizer's kernels, and the wait before them)."""
    times: dict[str, tuple[float, int]] = {}
    for event in prof.events():
        if str(event.device_type).endswith("CUDA") and not getattr(event, "is_user_annotation", False):
            seconds, count = times.get(event.name, (0.0, 0))
            times[event.name] = (seconds + event.time_range.elapsed_us() / 1e6, count + 1)
    return times
