"""The ``orpo`` trainer: Odds Ratio Preference Optimization (trl's experimental ORPOTrainer) on the
same ``prompt``/``chosen``/``rejected`` rows as ``dpo``, with no reference model.

The loss is the chosen sequence's NLL (prompt and answer tokens) minus ``beta`` times the mean
``log sigmoid`` of the log-odds ratio of the length-averaged answer log-probabilities. trl builds
both from the full ``[tokens x vocab]`` logits; here they come from the ``token_logprobs`` op
(:mod:`ftengine.plugins.trainers.paired`).
"""

from __future__ import annotations

from typing import Any

from ftengine.core.types import TrainRequest
from ftengine.plugins.trainers.arguments import trainer_inputs
from ftengine.plugins.trainers.arguments import trl_config
from ftengine.plugins.trainers.options import ORPOOptions
from ftengine.plugins.trainers.paired import paired_forward


class ORPOTrainerPlugin:
    name = "orpo"
    sample_kinds = ("preference",)
    options_schema = ORPOOptions

    def create(self, request: TrainRequest) -> Any:
        from trl.experimental.orpo import ORPOConfig
        from trl.experimental.orpo import ORPOTrainer

        class TokenLogprobsORPO(ORPOTrainer):
            def concatenated_forward(self, model, batch):
                if self.is_encoder_decoder or self.aux_loss_enabled:
                    return super().concatenated_forward(model, batch)
                return paired_forward(self, model, batch, self.padding_value, nll_on_prompt=True)

        options = request.options or ORPOOptions()
        args = trl_config(ORPOConfig, request, beta=options.beta, max_length=request.max_seq_length)
        return TokenLogprobsORPO(**trainer_inputs(request, args))
