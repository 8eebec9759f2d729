"""SimPO, the ``dpo`` trainer's ``loss_type: simpo``: length-normalized and reference-free.

Per pair, with ``m`` a row's mean answer log-probability under the policy::

    loss = -log sigmoid(beta * (m_chosen - m_rejected) - simpo_gamma)

(with ``label_smoothing`` e, ``(1 - e)`` times that plus ``e`` times the flipped pair's), plus
``cpo_alpha`` times the chosen answers' NLL (CPO-SimPO; 0 by default, as in the SimPO paper). trl
carries this loss in its experimental ``CPOTrainer`` (``loss_type="simpo"``); its forward comes from
the ``token_logprobs`` op here (:mod:`ftengine.plugins.trainers.paired`), and no reference model is
built or run.
"""

from __future__ import annotations

from typing import Any

from ftengine.core.types import TrainRequest
from ftengine.plugins.trainers.arguments import trainer_inputs
from ftengine.plugins.trainers.arguments import trl_config
from ftengine.plugins.trainers.options import DPOOptions
from ftengine.plugins.trainers.paired import paired_forward


def simpo_trainer(request: TrainRequest, options: DPOOptions) -> Any:
    """trl's ``CPOTrainer`` with its SimPO loss, scoring tokens with the ``token_logprobs`` op."""
    from trl.experimental.cpo import CPOConfig
    from trl.experimental.cpo import CPOTrainer

    class TokenLogprobsCPO(CPOTrainer):
        def concatenated_forward(self, model, batch):
            if self.is_encoder_decoder or self.aux_loss_enabled:
                return super().concatenated_forward(model, batch)
            return paired_forward(self, model, batch, self.pad_token_id, nll_on_prompt=False)

    args = trl_config(CPOConfig, request, loss_type="simpo", beta=options.beta, simpo_gamma=options.simpo_gamma,
                      cpo_alpha=options.cpo_alpha, label_smoothing=options.label_smoothing,
                      max_length=request.max_seq_length)
    return TokenLogprobsCPO(**trainer_inputs(request, args))
