"""The module tree walked once a run, not three times a step.

At every optimizer step the Hugging Face trainer calls ``model.train()``, ``model.parameters()`` (to clip the
gradients) and ``model.zero_grad()``, and each walks every module of the model. A LoRA model has many: peft
gives each adapted projection about ten (the ``ModuleDict`` of each adapter's A, B and dropout, ...), so an 8B
model has thousands, and the three walks cost tens of milliseconds of host time a step, time the GPU spends
idle after the trainer's per-step read-backs. The tree does not change while the model trains, so
:class:`ModuleTreeCache` lists the modules and parameters once, when training begins (after the trainer has
loaded a checkpoint to resume from and prepared the model), and answers those three calls from the lists until
training ends.

Only a model trained by one process on at most one device is served so: under DDP or ``DataParallel`` the
trainer steps a wrapper whose own walks do not call the model's methods (nothing to gain), and the multi-process
paths stay exactly as transformers and accelerate run them.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from transformers import TrainerCallback

_CACHED = ("train", "parameters")


class CachedWalks:
    """The lists :func:`cache_walks` answers from, and the two methods it puts on the model.

    Bound methods of this object (not closures) so that a copy of the model made while they are on it
    (``copy.deepcopy``, as a reference model or an average of the weights is made) gets lists of its own
    modules and parameters, not the original's.
    """

    def __init__(self, model: torch.nn.Module):
        self.model = model
        self.modules = list(model.modules())
        self.params = list(model.parameters())

    def train(self, mode: bool = True) -> torch.nn.Module:
        if all(module.training is mode for module in self.modules):
            return self.model
        return torch.nn.Module.train(self.model, mode)

    def parameters(self, recurse: bool = True) -> Iterator[torch.nn.Parameter]:
        return iter(self.params) if recurse else torch.nn.Module.parameters(self.model, recurse=False)


def cache_walks(model: torch.nn.Module) -> None:
    """Answer ``model.train()`` / ``.eval()``, ``model.parameters()`` and ``model.zero_grad()`` from lists of the
    modules and parameters taken now. Undone by :func:`uncache_walks`.

    ``train(mode)`` with every module already in ``mode`` returns at once: the trainer asks at every step for the
    mode the model is in. A change of mode (to evaluate, and back) takes ``torch.nn.Module``'s walk, so the
    modules with a ``train()`` of their own (transformers' models, peft's DoRA layers, a module keeping its
    batch norms in eval mode) still act on it.
    """
    walks = CachedWalks(model)
    model.train = walks.train
    model.parameters = walks.parameters  # Module.zero_grad walks self.parameters()


def uncache_walks(model: torch.nn.Module) -> None:
    """Back to the walks of ``torch.nn.Module``."""
    for name in _CACHED:
        model.__dict__.pop(name, None)


def walks_cacheable(model: Any, args: Any) -> bool:
    """Whether :func:`cache_walks` serves ``model`` trained with ``args`` (the trainer's arguments): one process
    on at most one device, and a model class keeping ``torch.nn.Module``'s own ``train`` and ``parameters``."""
    return (isinstance(model, torch.nn.Module) and args.world_size == 1 and args.n_gpu <= 1
            and type(model).train is torch.nn.Module.train
            and type(model).parameters is torch.nn.Module.parameters)


class ModuleTreeCache(TrainerCallback):
    """Caches the model's module walks from the start of training to its end; see the module docstring.
    Add it with :func:`add_module_tree_cache`, which also undoes the cache when training fails."""

    def __init__(self) -> None:
        self.model: torch.nn.Module | None = None

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if walks_cacheable(model, args):
            cache_walks(model)
            self.model = model

    def on_train_end(self, args, state, control, **kwargs):
        self.release()

    def release(self) -> None:
        if self.model is not None:
            uncache_walks(self.model)
            self.model = None


def add_module_tree_cache(trainer: Any) -> ModuleTreeCache:
    """A :class:`ModuleTreeCache` on ``trainer``, released when ``trainer.train()`` returns or raises."""
    cache = ModuleTreeCache()
    trainer.add_callback(cache)
    train = trainer.train

    def train_with_cache(*args: Any, **kwargs: Any) -> Any:
        try:
            return train(*args, **kwargs)
        finally:
            cache.release()

    trainer.train = train_with_cache
    return cache
