"""The Hugging Face training arguments every trainer plugin shares, from the run config."""

from __future__ import annotations

from typing import Any

import torch


def precision_flags(model: Any) -> dict[str, bool]:
    """Mixed-precision flags matching the model's compute dtype (none on the CPU)."""
    if not torch.cuda.is_available():
        return {"use_cpu": True, "bf16": False, "fp16": False}
    dtype = getattr(model, "dtype", torch.float32)
    quant = getattr(getattr(model, "config", None), "quantization_config", None)
    compute = getattr(quant, "bnb_4bit_compute_dtype", None) if quant is not None else None
    dtype = compute if isinstance(compute, torch.dtype) else dtype
    return {"bf16": dtype == torch.bfloat16, "fp16": dtype == torch.float16}


def common_arguments(training: Any, output_dir: str, model: Any, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """Keyword arguments for a ``transformers.TrainingArguments`` subclass (trl's SFTConfig, ...).

    Gradient checkpointing is applied by the pipeline's adapt stage, so the trainer's own switch
    stays off; progress and metrics come from the core's callbacks, so the trainer's bar is off and
    its reporting integrations only those ``training.report_to`` names. ``extra`` (the engine's
    ``TrainRequest.trainer_arguments``: the multi-process strategy) is added last.
    """
    return dict(
        output_dir=output_dir,
        per_device_train_batch_size=training.per_device_train_batch_size,
        per_device_eval_batch_size=training.per_device_train_batch_size,
        gradient_accumulation_steps=training.gradient_accumulation_steps,
        learning_rate=training.learning_rate,
        max_steps=training.max_steps,
        num_train_epochs=training.num_train_epochs,
        lr_scheduler_type=training.lr_scheduler_type,
        warmup_steps=training.warmup_steps,
        weight_decay=training.weight_decay,
        optim=training.optim,
        max_grad_norm=training.max_grad_norm,
        seed=training.seed,
        data_seed=training.seed,
        logging_steps=training.logging_steps,
        save_strategy="steps",
        save_steps=training.save_steps,
        save_total_limit=training.save_total_limit,
        eval_strategy="steps" if training.eval_steps else "no",
        eval_steps=training.eval_steps,
        report_to=getattr(training, "report_to", "none"),
        load_best_model_at_end=getattr(training, "load_best_model_at_end", False),
        metric_for_best_model=getattr(training, "metric_for_best_model", None) or (
            "eval_loss" if getattr(training, "early_stopping_patience", None)
            or getattr(training, "load_best_model_at_end", False) else None),
        disable_tqdm=True,
        remove_unused_columns=False,
        include_num_input_tokens_seen="non_padding",
        dataloader_num_workers=0,
        gradient_checkpointing=False,
        **precision_flags(model),
        **(extra or {}),
    )


def trl_config(config_class: Any, request: Any, **fields: Any) -> Any:
    """A trl config (``DPOConfig``, ``GRPOConfig``, ...) of :func:`common_arguments` plus the trainer's ``fields``."""
    return config_class(**common_arguments(request.training, str(request.output_dir), request.model,
                                           request.trainer_arguments), **fields)


def trainer_inputs(request: Any, args: Any, **overrides: Any) -> dict[str, Any]:
    """The keyword arguments every trl trainer takes, from the engine's ``TrainRequest``; ``overrides`` win."""
    return {"model": request.model, "args": args, "train_dataset": request.train_dataset,
            "eval_dataset": request.eval_dataset, "processing_class": request.tokenizer,
            "callbacks": request.callbacks, **overrides}
