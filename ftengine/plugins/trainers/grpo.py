"""The ``grpo`` trainer: Group Relative Policy Optimization on trl's GRPOTrainer.

Each prompt row is answered ``num_generations`` times by the model being trained (adapters
active, sampled at ``temperature`` by the engine's decoder through ``TrainRequest.route_generate``,
or by transformers' ``generate``); the reward functions score every completion; each completion's
advantage is its reward relative to its group's; the policy-gradient loss (``loss_type``: grpo,
dr_grpo, bnpo, dapo) is clipped at ``epsilon``, plus ``beta`` times the KL to the reference (the
adapter switched off). Log-probabilities of policy and reference come from the ``token_logprobs``
op at the sampling temperature, never from full logits.
"""

from __future__ import annotations

import logging
from typing import Any

from ftengine.core import plugins
from ftengine.core.errors import ConfigError
from ftengine.core.types import TrainRequest
from ftengine.plugins.trainers.arguments import trainer_inputs
from ftengine.plugins.trainers.arguments import trl_config
from ftengine.plugins.trainers.dpo import drop_ref_adapter
from ftengine.plugins.trainers.logprob_head import install_on_trainer
from ftengine.plugins.trainers.options import GRPOOptions
from ftengine.plugins.trainers.rewards import checked_reward
from ftengine.plugins.trainers.rewards import resolve_reward

log = logging.getLogger("ftengine")

METRIC_ALIASES = {"completion_length": "completions/mean_length"}
"""Short names the run's ``metrics.jsonl`` also gets for trl's metrics."""


def _aliases_callback() -> Any:
    from transformers import TrainerCallback

    class Aliases(TrainerCallback):
        """Adds :data:`METRIC_ALIASES` to each log before the engine's callbacks record it."""

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs is not None:
                logs.update({short: logs[name] for short, name in METRIC_ALIASES.items() if name in logs})

    return Aliases()


def reward_functions(options: GRPOOptions) -> list[Any]:
    """The configured reward functions, resolved and wrapped for trl (:func:`checked_reward`)."""
    registered = plugins.get_registry("rewards")
    return [checked_reward(*resolve_reward(spec, registered)) for spec in options.reward_funcs]


def check_batch(training: Any, options: GRPOOptions) -> None:
    """The generation batch must hold whole groups of ``num_generations`` completions."""
    batch = options.generation_batch_size or training.per_device_train_batch_size * training.gradient_accumulation_steps
    if batch % options.num_generations:
        raise ConfigError(f"training.trainer_options.num_generations: {options.num_generations} does not divide the "
                          f"generation batch of {batch} completions (per_device_train_batch_size x "
                          f"gradient_accumulation_steps, or generation_batch_size)")


class GRPOTrainerPlugin:
    name = "grpo"
    sample_kinds = ("prompt",)
    options_schema = GRPOOptions

    def create(self, request: TrainRequest) -> Any:
        from trl import GRPOConfig
        from trl.trainer.grpo_trainer import GRPOTrainer  # the class itself, whoever replaced trl.GRPOTrainer

        options = request.options
        if options is None:
            raise ConfigError("training.trainer_options.reward_funcs: grpo needs at least one reward function")
        check_batch(request.training, options)
        fields = ("num_generations", "max_completion_length", "temperature", "top_p", "top_k", "beta", "epsilon",
                  "epsilon_high", "loss_type", "scale_rewards", "num_iterations", "mask_truncated_completions",
                  "generation_batch_size", "reward_weights")
        args = trl_config(GRPOConfig, request, **{name: getattr(options, name) for name in fields})
        trainer = GRPOTrainer(**trainer_inputs(request, args, reward_funcs=reward_functions(options),
                                               callbacks=[_aliases_callback(), *request.callbacks]))
        drop_ref_adapter(request.model)
        log.info(install_on_trainer(trainer, temperature=options.temperature))
        if request.route_generate is not None:
            log.info(request.route_generate(trainer.model, options.generation_backend))
        return trainer
