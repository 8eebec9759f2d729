"""The forward of trl's reference-free pair trainers (ORPO, and CPO which carries SimPO) through the
``token_logprobs`` kernel op.

Both trainers run the chosen and rejected rows as one concatenated batch and build, from the full
``[tokens x vocab]`` logits, each row's mean answer log-probability and an NLL term on the chosen
rows. :func:`paired_forward` computes the same quantities from one ``token_logprobs`` call over the
attended positions instead.
"""

from __future__ import annotations

from typing import Any

import torch

from ftengine.core.kernels import get_op


def paired_forward(trainer: Any, model: Any, batch: dict[str, Any], padding_value: int,
                   nll_on_prompt: bool) -> tuple[torch.Tensor, ...]:
    """trl's ``concatenated_forward`` outputs from the backbone's hidden states and the op.

    Args:
        trainer: the trl ORPO or CPO trainer (its ``concatenated_inputs`` builds the batch).
        model: the policy.
        batch: the collated chosen/rejected batch.
        padding_value: the trainer's padding id for the concatenated input ids.
        nll_on_prompt: ORPO's NLL covers every attended chosen token; CPO's only the answer's.

    Returns:
        Per-row mean answer log-probabilities of chosen and rejected ``(B,)``, the mean logit of
        each side's scored tokens (for the ``logits/*`` metrics), and the chosen NLL.
    """
    batch = trainer.concatenated_inputs(batch, is_encoder_decoder=False, padding_value=padding_value,
                                        device=trainer.accelerator.device)
    input_ids, attention = batch["concatenated_input_ids"], batch["concatenated_attention_mask"]
    n_chosen = input_ids.shape[0] // 2
    causal_lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    hidden = causal_lm.base_model(input_ids, attention_mask=attention, use_cache=False).last_hidden_state[:, :-1]
    targets = input_ids[:, 1:]
    scored = attention[:, 1:] == 1  # (2B, T-1)
    head = causal_lm.get_output_embeddings().weight
    logp, stats = get_op("token_logprobs")(hidden[scored], head, targets[scored],
                                           softcap=getattr(causal_lm.config, "final_logit_softcapping", None),
                                           with_stats=True)
    per_token = logp.new_zeros(scored.shape).masked_scatter(scored, logp)
    mean_logit = stats.new_zeros(scored.shape).masked_scatter(scored, stats[:, 1])
    answer = batch["concatenated_labels"][:, 1:] != -100
    avg_logps = (per_token * answer).sum(-1) / answer.sum(-1)
    nll_mask = (scored if nll_on_prompt else answer)[:n_chosen]
    nll = -(per_token[:n_chosen] * nll_mask).sum() / nll_mask.sum()
    sides = (slice(None, n_chosen), slice(n_chosen, None))
    logits = [mean_logit[side][scored[side]] for side in sides]
    return avg_logps[:n_chosen], avg_logps[n_chosen:], logits[0], logits[1], nll
