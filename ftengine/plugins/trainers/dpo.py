"""The ``dpo`` trainer: Direct Preference Optimization on trl's DPOTrainer, any of trl's DPO losses
(``loss_type``: sigmoid = DPO, ipo = IPO, hinge, robust, ...), and SimPO (``loss_type: simpo``,
reference-free: :mod:`ftengine.plugins.trainers.simpo`).

The data stage hands it conversational ``prompt``/``chosen``/``rejected`` rows (string pairs
become a user turn and assistant turns); trl renders them with the tokenizer's chat template, so
the trained tokens of each answer are exactly what the template adds after the prompt's
generation prompt, end-of-turn token included, as in SFT.

The reference model:
  * LoRA: the same model with its adapter disabled (no second copy of the weights);
  * full fine-tuning: a frozen copy of the model as it is when training starts.

The log-probabilities of policy and reference come from the ``token_logprobs`` kernel op
(:mod:`ftengine.plugins.trainers.logprob_head`): no ``[tokens x vocab]`` logits.
"""

from __future__ import annotations

import copy
import logging
from typing import Any

from ftengine.core.types import TrainRequest
from ftengine.plugins.trainers.arguments import trainer_inputs
from ftengine.plugins.trainers.arguments import trl_config
from ftengine.plugins.trainers.logprob_head import install_on_trainer
from ftengine.plugins.trainers.options import DPOOptions
from ftengine.plugins.trainers.simpo import simpo_trainer

log = logging.getLogger("ftengine")


def is_peft(model: Any) -> bool:
    return hasattr(model, "peft_config") and hasattr(model, "disable_adapter")


def frozen_copy(model: Any) -> Any:
    """A copy of ``model`` in eval mode with no trainable parameter (the full fine-tuning reference)."""
    reference = copy.deepcopy(model)
    reference.eval()
    for param in reference.parameters():
        param.requires_grad_(False)
    return reference


def reference_model(request: TrainRequest) -> Any:
    """The given reference; ``None`` for LoRA (trl disables the adapter); else a frozen copy."""
    if request.ref_model is not None or is_peft(request.model):
        return request.ref_model
    return frozen_copy(request.model)


def drop_ref_adapter(model: Any) -> None:
    """trl keeps a copy of the adapter as it was at the start as the reference. Without it trl
    computes the reference with the adapter disabled: the base model, which is what a fresh
    adapter starts from, and stays so when a run is resumed from a partly trained adapter."""
    if is_peft(model) and "ref" in model.peft_config:
        model.delete_adapter("ref")


def with_reference(trainer_class: Any, request: TrainRequest, args: Any) -> Any:
    """A trl trainer of the DPO family (``DPOTrainer``, ``KTOTrainer``) with the reference of
    :func:`reference_model`, its log-probabilities through the ``token_logprobs`` op."""
    ref_model = reference_model(request)
    trainer = trainer_class(**trainer_inputs(request, args, ref_model=ref_model))
    if ref_model is None:
        drop_ref_adapter(request.model)
    log.info(install_on_trainer(trainer))
    return trainer


class DPOTrainerPlugin:
    name = "dpo"
    sample_kinds = ("preference",)
    options_schema = DPOOptions

    def create(self, request: TrainRequest) -> Any:
        """A trl ``DPOTrainer`` with the ``dpo`` options, truncating at the request's
        ``max_seq_length`` (the length the data stage counted with)."""
        from trl import DPOConfig
        from trl.trainer.dpo_trainer import DPOTrainer  # the class itself, whoever replaced trl.DPOTrainer

        options = request.options or DPOOptions()
        if options.loss_type == "simpo":
            return simpo_trainer(request, options)
        loss_type = options.loss_type if isinstance(options.loss_type, list) else [options.loss_type]
        args = trl_config(DPOConfig, request, beta=options.beta, loss_type=loss_type,
                          loss_weights=options.loss_weights, label_smoothing=options.label_smoothing,
                          max_length=request.max_seq_length, precompute_ref_log_probs=False)
        return with_reference(DPOTrainer, request, args)
