"""The ``dpo`` trainer: Direct Preference Optimization on trl's DPOTrainer.

The data stage hands it conversational ``prompt``/``chosen``/``rejected`` rows (string pairs
become a user turn and assistant turns); trl renders them with the tokenizer's chat template, so
the trained tokens of each answer are exactly what the template adds after the prompt's
generation prompt, end-of-turn token included, as in SFT.

The reference model:
  * LoRA: the same model with its adapter disabled (no second copy of the weights);
  * full fine-tuning: a frozen copy of the model as it is when training starts.
"""

from __future__ import annotations

import copy
from typing import Any

from ftengine.core.types import TrainRequest
from ftengine.plugins.trainers.arguments import common_arguments


def _is_peft(model: Any) -> bool:
    return hasattr(model, "peft_config") and hasattr(model, "disable_adapter")


def frozen_copy(model: Any) -> Any:
    """A copy of ``model`` in eval mode with no trainable parameter (the full fine-tuning reference)."""
    reference = copy.deepcopy(model)
    reference.eval()
    for param in reference.parameters():
        param.requires_grad_(False)
    return reference


class DPOTrainerPlugin:
    name = "dpo"
    sample_kinds = ("preference",)

    def create(self, request: TrainRequest) -> Any:
        """A trl ``DPOTrainer`` with ``training.beta`` and ``training.loss_type``, truncating at the
        request's ``max_seq_length`` (the length the data stage counted with)."""
        from trl import DPOConfig
        from trl.trainer.dpo_trainer import DPOTrainer  # the class itself, whoever replaced trl.DPOTrainer

        model, tokenizer, training = request.model, request.tokenizer, request.training
        args = DPOConfig(
            **common_arguments(training, str(request.output_dir), model, request.trainer_arguments),
            beta=training.beta,
            loss_type=[training.loss_type],
            max_length=request.max_seq_length,
            precompute_ref_log_probs=False,
        )
        peft = _is_peft(model)
        ref_model = request.ref_model
        if ref_model is None and not peft:
            ref_model = frozen_copy(model)
        trainer = DPOTrainer(
            model=model,
            ref_model=ref_model,
            args=args,
            train_dataset=request.train_dataset,
            eval_dataset=request.eval_dataset,
            processing_class=tokenizer,
            callbacks=request.callbacks,
        )
        if peft and ref_model is None and "ref" in model.peft_config:
            # trl keeps a copy of the adapter as it was at the start as the reference. Without it trl
            # computes the reference with the adapter disabled: the base model, which is what a fresh
            # adapter starts from, and stays so when a run is resumed from a partly trained adapter.
            model.delete_adapter("ref")
        return trainer
