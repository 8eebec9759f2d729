"""Stage 5: the trainer plugin trains, with the engine's progress, checkpoint, interrupt and
non-finite-guard callbacks."""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass
from dataclasses import field
from pathlib import Path
from typing import Any

import torch

from ftengine.core import plugins
from ftengine.core.config import TrainingConfig
from ftengine.core.config import trainer_options
from ftengine.core.errors import NonFiniteError
from ftengine.core.types import TrainRequest
from ftengine.engine import distributed
from ftengine.engine import static_decode
from ftengine.engine.guard import NonFiniteGuard
from ftengine.engine.memory import checkpointing
from ftengine.engine.module_tree import add_module_tree_cache
from ftengine.engine.progress import CheckpointMarkerCallback
from ftengine.engine.progress import InterruptCallback
from ftengine.engine.progress import ProgressCallback
from ftengine.engine.rundir import RunDir
from ftengine.engine.settings import ModelSettings
from ftengine.engine.settings import settings_of


@dataclass
class TrainResult:
    steps: int
    first_loss: float | None
    last_loss: float | None
    wall_seconds: float
    interrupted: bool
    checkpoint: str | None
    losses: list[tuple[int, float]] = field(default_factory=list)
    skipped_steps: list[int] = field(default_factory=list)  # steps dropped by training.on_nonfinite: skip_step
    eval_losses: list[tuple[int, float]] = field(default_factory=list)
    rewards: dict[str, list[tuple[int, float]]] = field(default_factory=dict)
    """An RL trainer's logged mean rewards: ``"reward"`` (the weighted total) and each reward function's."""


def reward_curves(metrics: list[dict[str, Any]]) -> dict[str, list[tuple[int, float]]]:
    """``(step, mean)`` per logged step of the total ``reward`` and of each ``rewards/<name>/mean``, as RL
    trainers log them; empty for trainers without rewards."""
    curves: dict[str, list[tuple[int, float]]] = {}
    for record in metrics:
        for key, value in record.items():
            if key == "reward":
                name = key
            elif key.startswith("rewards/") and key.endswith("/mean"):
                name = key.removeprefix("rewards/").removesuffix("/mean")
            else:
                continue
            if value is not None:
                curves.setdefault(name, []).append((record["step"], value))
    return curves


def count_parameters_once(trainer: Any) -> Any:
    """``trainer.floating_point_ops`` (the ``total_flos`` it logs) with the parameter count taken once:
    transformers' own walks every parameter of the model again at each step (``num_parameters``), host
    time the GPU waits for at every step boundary. The estimate is transformers' own: 6 x tokens x
    parameters (embeddings excluded)."""
    model = trainer.model
    if not hasattr(model, "num_parameters"):
        return trainer
    parameters = model.num_parameters(exclude_embeddings=True)
    main_input = getattr(model, "main_input_name", "input_ids")

    def floating_point_ops(inputs: Any) -> int:
        tokens = inputs.get(main_input) if isinstance(inputs, Mapping) else None  # GRPO's are a list of rows
        return 6 * tokens.numel() * parameters if isinstance(tokens, torch.Tensor) else 0

    trainer.floating_point_ops = floating_point_ops
    return trainer


def light_steps(trainer: Any) -> Any:
    """``trainer`` with the host work it would repeat at every step done once: the flops estimate's parameter
    count (:func:`count_parameters_once`) and the walks of the module tree
    (:mod:`ftengine.engine.module_tree`)."""
    add_module_tree_cache(trainer)
    return count_parameters_once(trainer)


def create_trainer(model: Any, tokenizer: Any, train_dataset: Any, eval_dataset: Any, training: TrainingConfig,
                   output_dir: Path, callbacks: list[Any], *, max_seq_length: int, ref_model: Any = None,
                   trainer_arguments: dict[str, Any] | None = None, data_collator: Any = None) -> Any:
    """The ``training.trainer`` plugin's trainer, made as every training path makes it (:func:`train`,
    ``ftengine.make_trainer``): the plugin's :class:`~ftengine.core.types.TrainRequest` (the trainer's options
    from ``training``, the model's attention implementation, generation routed to the static-cache decoder
    where the backend allows) and :func:`light_steps`."""
    request = TrainRequest(model=model, tokenizer=tokenizer, train_dataset=train_dataset, eval_dataset=eval_dataset,
                           training=training, output_dir=output_dir, ref_model=ref_model, callbacks=callbacks,
                           max_seq_length=max_seq_length, attn_implementation=model.config._attn_implementation,
                           trainer_arguments=trainer_arguments or {}, options=trainer_options(training),
                           data_collator=data_collator, route_generate=static_decode.route_for_backend)
    return light_steps(plugins.get("trainers", training.trainer).create(request))


def train(model: Any, tokenizer: Any, train_dataset: Any, eval_dataset: Any, training: TrainingConfig,
          run_dir: RunDir, resume_from: Path | None = None, ref_model: Any = None,
          settings: ModelSettings | None = None, strategy: str = "single",
          trainer_arguments: dict[str, Any] | None = None, data_collator: Any = None) -> TrainResult:
    """Stage 5: the trainer plugin runs, with the engine's progress, checkpoint and interrupt callbacks.

    ``settings`` default to those :func:`ftengine.engine.pipeline.load` left on the model; ``strategy`` and
    ``trainer_arguments``: see :mod:`ftengine.engine.distributed`."""
    settings = settings or settings_of(model)
    progress = ProgressCallback(run_dir.metrics_path, main=run_dir.writer)
    interrupt = InterruptCallback()
    markers = CheckpointMarkerCallback(distributed.rank_info().world_size, strategy)
    guard = NonFiniteGuard(training.on_nonfinite, training.max_nonfinite_steps)
    callbacks = [progress, markers, interrupt]
    if training.early_stopping_patience:
        from transformers import EarlyStoppingCallback

        callbacks.append(EarlyStoppingCallback(early_stopping_patience=training.early_stopping_patience))
    callbacks.append(guard)  # last: it vetoes the saves the others ask for once a step went non-finite
    trainer = create_trainer(model, tokenizer, train_dataset, eval_dataset, training, run_dir.checkpoints, callbacks,
                             ref_model=ref_model, max_seq_length=settings.max_seq_length,
                             trainer_arguments=trainer_arguments, data_collator=data_collator)
    guard.watch(trainer)
    from transformers.trainer_callback import PrinterCallback

    trainer.remove_callback(PrinterCallback)  # the engine's ProgressCallback reports instead
    start = time.perf_counter()
    interrupt.install()
    try:
        trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
    finally:
        interrupt.restore()
        checkpointing.release_host_buffers(model)
    wall = time.perf_counter() - start
    metrics = run_dir.read_metrics()
    losses = [(m["step"], m["loss"]) for m in metrics if m.get("loss") is not None]
    eval_losses = [(m["step"], m["eval_loss"]) for m in metrics if m.get("eval_loss") is not None]
    rewards = reward_curves(metrics)
    run_dir.plot_loss()
    latest = run_dir.latest_checkpoint()
    if guard.failure is not None:
        raise NonFiniteError(f"{guard.failure}; training stopped, nothing of that step was saved; last good "
                             f"checkpoint: {latest or 'none'}")
    return TrainResult(
        steps=trainer.state.global_step,
        first_loss=losses[0][1] if losses else None,
        last_loss=losses[-1][1] if losses else None,
        wall_seconds=wall,
        interrupted=interrupt.interrupted,
        checkpoint=str(latest) if latest else None,
        losses=losses,
        skipped_steps=guard.skipped,
        eval_losses=eval_losses,
        rewards=rewards,
    )
