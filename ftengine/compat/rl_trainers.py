"""trl's ``GRPOTrainer``, ``KTOTrainer`` and ``ORPOTrainer`` called the notebook way (``GRPOConfig`` /
``KTOConfig`` / ``ORPOConfig``, ``processing_class=`` or ``tokenizer=``, reward functions written for trl)
become the trainers ftengine's ``grpo``, ``kto`` and ``orpo`` plugins build: the engine's decoder for the
sampled completions, log-probabilities without full logits, the adapter switched off as the reference.
trl keeps ORPO in ``trl.experimental``; the compat import also puts ``ORPOConfig`` and ``ORPOTrainer`` at
trl's top level, where the notebooks written before that move import them.

Reward functions keep trl's calling convention: for conversational prompts a completion arrives as
``[{"role": "assistant", "content": text}]``, as trl hands it (ftengine's own reward functions take the
texts); an exception or a NaN still names the function and the dataset row.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

from trl import GRPOTrainer as TrlGRPOTrainer
from trl import KTOTrainer as TrlKTOTrainer
from trl.experimental.orpo import ORPOConfig
from trl.experimental.orpo import ORPOTrainer as TrlORPOTrainer

import ftengine
from ftengine.compat._arguments import strict
from ftengine.compat.trainers import notebook_tokenizer
from ftengine.compat.trainers import training_keys
from ftengine.core.errors import ConfigError
from ftengine.engine.settings import settings_of

__all__ = ["GRPOTrainer", "KTOTrainer", "ORPOConfig", "ORPOTrainer", "trl_reward"]

GRPO_FIELDS = ("num_generations", "max_completion_length", "temperature", "top_p", "top_k", "beta", "epsilon",
               "epsilon_high", "loss_type", "scale_rewards", "num_iterations", "mask_truncated_completions",
               "generation_batch_size", "reward_weights")
"""``GRPOConfig`` fields passed on as the ``grpo`` trainer's options of the same names."""

KTO_FIELDS = ("beta", "desirable_weight", "undesirable_weight", "loss_type")
"""``KTOConfig`` fields passed on as the ``kto`` trainer's options."""


def trl_reward(function: Callable[..., Any]) -> Callable[..., Any]:
    """``function``, written for trl, called with the completions as trl shapes them: each completion of a
    conversational prompt (a list of messages) as ``[{"role": "assistant", "content": text}]``."""

    @functools.wraps(function)
    def reward(completions: list[str], prompts: list[Any], **columns: Any) -> Any:
        if prompts and isinstance(prompts[0], list):
            completions = [[{"role": "assistant", "content": text}] for text in completions]
        return function(prompts=prompts, completions=completions, **columns)

    return reward


def _options(args: Any, fields: tuple[str, ...]) -> dict[str, Any]:
    """The config's values of ``fields`` that are set."""
    return {name: getattr(args, name) for name in fields if getattr(args, name, None) is not None}


def _loaded(dataset: Any, tokenizer: Any, format: str, trainer: str, max_length: int) -> Any:
    """trl's dataset for ``trainer`` read in ftengine's ``format`` (the one trl's columns mean; detection
    could also match a format of another plugin on the same keys)."""
    if dataset is None:
        return None
    return ftengine.load_dataset(dataset, tokenizer, format=format, trainer=trainer, max_seq_length=max_length)


@strict
def _grpo(model: Any, reward_funcs: Any, args: Any = None, train_dataset: Any = None, eval_dataset: Any = None,
          processing_class: Any = None, tokenizer: Any = None, callbacks: list[Any] | None = None) -> Any:
    tokenizer = notebook_tokenizer(tokenizer, processing_class, "GRPOTrainer")
    functions = reward_funcs if isinstance(reward_funcs, (list, tuple)) else [reward_funcs]
    if not functions or not all(callable(f) or isinstance(f, str) for f in functions):
        raise ConfigError("GRPOTrainer: reward_funcs: expected a reward function or a list of them")
    if args is not None and getattr(args, "use_vllm", False):
        raise ConfigError("GRPOConfig: use_vllm=True: ftengine samples the completions with its own decoder "
                          "(static KV cache, CUDA-graph steps on a GPU); leave use_vllm off")
    options = _options(args, GRPO_FIELDS)
    options["reward_funcs"] = [trl_reward(f) if callable(f) else f for f in functions]
    max_length = settings_of(model).max_seq_length
    train, evaluation = (_loaded(d, tokenizer, "prompt", "grpo", max_length) for d in (train_dataset, eval_dataset))
    return ftengine.make_trainer(model, tokenizer, train, "grpo", eval_dataset=evaluation,
                                 output_dir=getattr(args, "output_dir", None) or "outputs", callbacks=callbacks,
                                 max_seq_length=max_length, **training_keys(args), **options)


@strict
def _kto(model: Any, ref_model: Any = None, args: Any = None, train_dataset: Any = None, eval_dataset: Any = None,
         processing_class: Any = None, tokenizer: Any = None, data_collator: Any = None,
         callbacks: list[Any] | None = None) -> Any:
    tokenizer = notebook_tokenizer(tokenizer, processing_class, "KTOTrainer")
    max_length = getattr(args, "max_length", None) or settings_of(model).max_seq_length
    train, evaluation = (_loaded(d, tokenizer, "unpaired_preference", "kto", max_length)
                         for d in (train_dataset, eval_dataset))
    return ftengine.make_trainer(model, tokenizer, train, "kto", eval_dataset=evaluation,
                                 output_dir=getattr(args, "output_dir", None) or "outputs", callbacks=callbacks,
                                 ref_model=ref_model, max_seq_length=max_length, **training_keys(args),
                                 **_options(args, KTO_FIELDS))


@strict
def _orpo(model: Any, args: Any = None, data_collator: Any = None, train_dataset: Any = None, eval_dataset: Any = None,
          processing_class: Any = None, tokenizer: Any = None, callbacks: list[Any] | None = None) -> Any:
    tokenizer = notebook_tokenizer(tokenizer, processing_class, "ORPOTrainer")
    max_length = getattr(args, "max_length", None) or settings_of(model).max_seq_length
    return ftengine.make_trainer(model, tokenizer, train_dataset, "orpo", eval_dataset=eval_dataset,
                                 output_dir=getattr(args, "output_dir", None) or "outputs", callbacks=callbacks,
                                 max_seq_length=max_length, **training_keys(args), **_options(args, ("beta",)))


class GRPOTrainer(TrlGRPOTrainer):
    """Called as trl's ``GRPOTrainer`` (``model``, ``reward_funcs``, ``args=GRPOConfig(...)``,
    ``train_dataset``, ``processing_class``); returns the trainer ftengine's ``grpo`` trainer builds.
    ``use_vllm`` is refused (the engine's own decoder samples)."""

    def __new__(cls, *args: Any, **kwargs: Any) -> Any:
        return _grpo(*args, **kwargs)


class KTOTrainer(TrlKTOTrainer):
    """Called as trl's ``KTOTrainer`` (``args=KTOConfig(beta=, desirable_weight=, ...)``); returns the trainer
    ftengine's ``kto`` trainer builds (the adapter disabled as the reference for LoRA); ``data_collator``
    is replaced by ftengine's."""

    def __new__(cls, *args: Any, **kwargs: Any) -> Any:
        return _kto(*args, **kwargs)


class ORPOTrainer(TrlORPOTrainer):
    """Called as trl's ``ORPOTrainer`` (``args=ORPOConfig(beta=, max_length=, ...)``, ``tokenizer=``); returns the
    trainer ftengine's ``orpo`` trainer builds (the odds-ratio term from token log-probabilities, no full
    logits); ``data_collator`` is replaced by ftengine's and ``max_prompt_length`` / ``max_completion_length``
    give way to ``max_length``."""

    def __new__(cls, *args: Any, **kwargs: Any) -> Any:
        return _orpo(*args, **kwargs)

