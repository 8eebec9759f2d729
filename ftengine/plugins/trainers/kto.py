"""The ``kto`` trainer: Kahneman-Tversky Optimization on trl's KTOTrainer, from unpaired rows (a
prompt, one completion, ``label: true`` when it is desirable).

The reference is the one :mod:`ftengine.plugins.trainers.dpo` describes (adapter disabled, or a
frozen copy for full fine-tuning); log-probabilities come from the ``token_logprobs`` op. trl
estimates the KL term from the batch's prompts paired with other rows' completions, so a
micro-batch needs at least two rows.
"""

from __future__ import annotations

from typing import Any

from ftengine.core.errors import ConfigError
from ftengine.core.types import TrainRequest
from ftengine.plugins.trainers.arguments import trl_config
from ftengine.plugins.trainers.dpo import with_reference
from ftengine.plugins.trainers.options import KTOOptions


class KTOTrainerPlugin:
    name = "kto"
    sample_kinds = ("unpaired_preference",)
    options_schema = KTOOptions

    def create(self, request: TrainRequest) -> Any:
        from trl import KTOConfig
        from trl.trainer.kto_trainer import KTOTrainer  # the class itself, whoever replaced trl.KTOTrainer

        if request.training.per_device_train_batch_size < 2:
            raise ConfigError("training.per_device_train_batch_size: kto needs at least 2 rows per micro-batch "
                              "(its KL term pairs each prompt with another row's completion)")
        options = request.options or KTOOptions()
        args = trl_config(KTOConfig, request, beta=options.beta, desirable_weight=options.desirable_weight,
                          undesirable_weight=options.undesirable_weight, loss_type=options.loss_type,
                          max_length=request.max_seq_length)
        return with_reference(KTOTrainer, request, args)
