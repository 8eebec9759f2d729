"""The numerical guard: a non-finite loss, gradient norm, learning rate or weight never becomes a
"completed" run.

Each optimizer step is checked before it is taken: the micro-batch losses (recorded on the device,
no extra synchronisation per micro-batch), the total gradient norm and the learning rate. A bad step
never reaches the weights: its gradients are dropped, so the optimizer leaves every parameter as it
was. With ``training.on_nonfinite: stop`` (the default) the run then stops without saving, keeping
the last good checkpoint; with ``skip_step`` it goes on, until more than
``training.max_nonfinite_steps`` steps were skipped. After each step the trainable weights are
checked too (an update that overflowed them stops the run whatever the setting).
"""

from __future__ import annotations

import logging
import math
from typing import Any

import torch
from transformers import TrainerCallback

from ftengine.core.errors import NonFiniteError

log = logging.getLogger("ftengine")


def first_non_finite(named_tensors: Any) -> str | None:
    """The name of the first floating-point tensor holding an ``inf`` or ``nan``, else ``None``.

    Run after every optimizer step, so the common case costs one read-back from the device, not one a tensor
    (a LoRA on a 7B model has hundreds): the norm of all the tensors' norms is finite exactly when every
    tensor is, short of an overflow of the norm itself, and only a non-finite norm is looked into tensor by
    tensor.
    """
    checked = [(name, tensor) for name, tensor in named_tensors
               if tensor is not None and torch.is_floating_point(tensor) and tensor.device.type != "meta"]
    if not checked or math.isfinite(float(torch.nn.utils.get_total_norm([t.detach() for _, t in checked]))):
        return None
    for name, tensor in checked:
        if not bool(torch.isfinite(tensor).all()):
            return name
    return None


class NonFiniteGuard(TrainerCallback):
    """Checks every optimizer step; see the module docstring.

    Args:
        on_nonfinite: ``stop`` or ``skip_step``.
        max_nonfinite_steps: with ``skip_step``, how many steps may be skipped before the run stops.
    """

    def __init__(self, on_nonfinite: str = "stop", max_nonfinite_steps: int = 10):
        self.on_nonfinite = on_nonfinite
        self.max_nonfinite_steps = max_nonfinite_steps
        self.failure: str | None = None
        self.skipped: list[int] = []
        self._bad_loss: torch.Tensor | None = None
        self._trainable: list[tuple[str, torch.nn.Parameter]] | None = None

    def trainable(self, model: Any) -> list[tuple[str, torch.nn.Parameter]]:
        """The model's trainable parameters, listed once: walking every module at each step is host time
        the GPU waits for (the set does not change while training)."""
        if self._trainable is None:
            self._trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        return self._trainable

    def watch(self, trainer: Any) -> None:
        """Record every micro-batch loss ``trainer.training_step`` returns (a flag on the device)."""
        training_step = trainer.training_step

        def checked_training_step(*args: Any, **kwargs: Any) -> Any:
            loss = training_step(*args, **kwargs)
            bad = ~torch.isfinite(loss.detach()).all()
            self._bad_loss = bad if self._bad_loss is None else self._bad_loss | bad
            return loss

        trainer.training_step = checked_training_step

    def _problem(self, model: Any, optimizer: Any) -> str | None:
        """What is non-finite before this step; the loss flag and the gradient norm are read back together."""
        flags: dict[str, torch.Tensor] = {}
        if self._bad_loss is not None:
            flags["loss"] = self._bad_loss
        grads = [p.grad for _, p in self.trainable(model) if p.grad is not None]
        if grads:
            flags["gradient norm"] = ~torch.isfinite(torch.nn.utils.get_total_norm(grads))
        if flags:
            device = next(iter(flags.values())).device
            values = torch.stack([flag.reshape(()).to(device) for flag in flags.values()]).tolist()
            for what, bad in zip(flags, values, strict=True):
                if bad:
                    return what
        if optimizer is not None and any(not math.isfinite(float(group["lr"])) for group in optimizer.param_groups):
            return "learning rate"
        return None

    def on_pre_optimizer_step(self, args, state, control, model=None, optimizer=None, **kwargs):
        what = self._problem(model, optimizer)
        self._bad_loss = None
        if what is None:
            return control
        step = state.global_step + 1
        for _, param in self.trainable(model):  # the optimizer skips parameters without a gradient
            param.grad = None
        self.skipped.append(step)
        log.warning("non-finite %s at step %d: step skipped, weights unchanged", what, step)
        if self.on_nonfinite == "stop":
            self.failure = f"non-finite {what} at step {step}"
        elif len(self.skipped) > self.max_nonfinite_steps:
            self.failure = (f"non-finite {what} at step {step}: {len(self.skipped)} steps skipped, more than "
                            f"training.max_nonfinite_steps={self.max_nonfinite_steps}")
        return self._stop_if_failed(control)

    def on_optimizer_step(self, args, state, control, model=None, **kwargs):
        if self.failure is None:
            name = first_non_finite(self.trainable(model))
            if name is not None:
                self.failure = f"non-finite weight {name} after step {state.global_step + 1}"
        return self._stop_if_failed(control)

    def _stop_if_failed(self, control):
        if self.failure is not None:
            control.should_training_stop = True
            control.should_save = False
        return control

    # Other callbacks (the final step's save, a Ctrl-C) may ask for a checkpoint: never of a failed run.
    def on_step_end(self, args, state, control, **kwargs):
        return self._stop_if_failed(control)

    def on_log(self, args, state, control, logs=None, **kwargs):
        return self._stop_if_failed(control)

    def on_epoch_end(self, args, state, control, **kwargs):
        return self._stop_if_failed(control)


def guard_trainer(trainer: Any, on_nonfinite: str = "stop", max_nonfinite_steps: int = 10) -> NonFiniteGuard:
    """Guard a trainer its caller runs itself (``ftengine.make_trainer``, the compat trainers) as a run's is:
    a :class:`NonFiniteGuard` as its last callback, and ``trainer.train()`` raising :class:`NonFiniteError`
    when the guard stopped it, rather than returning as if training had completed."""
    guard = NonFiniteGuard(on_nonfinite, max_nonfinite_steps)
    trainer.add_callback(guard)
    guard.watch(trainer)
    train = trainer.train

    def guarded_train(*args: Any, **kwargs: Any) -> Any:
        result = train(*args, **kwargs)
        if guard.failure is not None:
            raise NonFiniteError(f"{guard.failure}; training stopped, nothing of that step was saved")
        return result

    trainer.train = guarded_train
    return guard
