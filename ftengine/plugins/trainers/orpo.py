"""The ``orpo`` trainer: Odds Ratio Preference Optimization (trl's experimental ORPOTrainer) on the
same ``prompt``/``chosen``/``rejected`` rows as ``dpo``, with no reference model.

The loss is the chosen sequence's NLL (prompt and answer tokens) minus ``beta`` times the mean
``log sigmoid`` of the log-odds ratio of the length-averaged answer log-probabilities. trl builds
both from the full ``[tokens x vocab]`` logits; :class:`TokenLogprobsORPO` computes the same
quantities from one ``token_logprobs`` call over the attended positions instead.
"""

from __future__ import annotations

from typing import Any

import torch

from ftengine.core.kernels import get_op
from ftengine.core.types import TrainRequest
from ftengine.plugins.trainers.arguments import common_arguments
from ftengine.plugins.trainers.options import ORPOOptions


def orpo_forward(trainer: Any, model: Any, batch: dict[str, Any]) -> tuple[torch.Tensor, ...]:
    """trl's ``concatenated_forward`` outputs from the backbone's hidden states and the
    ``token_logprobs`` op: per-row mean answer log-probabilities of chosen and rejected, the mean
    logit of each side's scored tokens (for the ``logits/*`` metrics), and the chosen NLL."""
    batch = trainer.concatenated_inputs(batch, is_encoder_decoder=False, padding_value=trainer.padding_value,
                                        device=trainer.accelerator.device)
    input_ids, attention = batch["concatenated_input_ids"], batch["concatenated_attention_mask"]
    n_chosen = input_ids.shape[0] // 2
    causal_lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    hidden = causal_lm.base_model(input_ids, attention_mask=attention, use_cache=False).last_hidden_state[:, :-1]
    targets = input_ids[:, 1:]
    scored = attention[:, 1:] == 1  # the chosen NLL covers every attended token
    head = causal_lm.get_output_embeddings().weight
    logp, stats = get_op("token_logprobs")(hidden[scored], head, targets[scored],
                                           softcap=getattr(causal_lm.config, "final_logit_softcapping", None),
                                           with_stats=True)
    per_token = logp.new_zeros(scored.shape).masked_scatter(scored, logp)
    mean_logit = stats.new_zeros(scored.shape).masked_scatter(scored, stats[:, 1])
    answer = batch["concatenated_labels"][:, 1:] != -100
    avg_logps = (per_token * answer).sum(-1) / answer.sum(-1)
    nll = -(per_token[:n_chosen] * scored[:n_chosen]).sum() / scored[:n_chosen].sum()
    sides = (slice(None, n_chosen), slice(n_chosen, None))
    logits = [mean_logit[side][scored[side]] for side in sides]
    return avg_logps[:n_chosen], avg_logps[n_chosen:], logits[0], logits[1], nll


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
                return orpo_forward(self, model, batch)

        options = request.options or ORPOOptions()
        model = request.model
        args = ORPOConfig(
            **common_arguments(request.training, str(request.output_dir), model, request.trainer_arguments),
            beta=options.beta,
            max_length=request.max_seq_length,
        )
        return TokenLogprobsORPO(
            model=model,
            args=args,
            train_dataset=request.train_dataset,
            eval_dataset=request.eval_dataset,
            processing_class=request.tokenizer,
            callbacks=request.callbacks,
        )
