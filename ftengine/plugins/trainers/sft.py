"""The ``sft`` trainer: supervised fine-tuning on trl's SFTTrainer, over rows the core's data
stage already tokenized with labels masked to the trained tokens (assistant turns by default),
and packed when ``data.packing`` is on (:class:`PadCollator` batches both kinds)."""

from __future__ import annotations

from typing import Any

from ftengine.core.kernels import FUSED_LOSS_ATTR
from ftengine.core.types import TrainRequest
from ftengine.plugins.trainers.arguments import trainer_inputs
from ftengine.plugins.trainers.arguments import trl_config
from ftengine.plugins.trainers.collator import PadCollator


def has_fused_loss(model: Any) -> bool:
    """Whether a model adapter made the model's forward compute its loss with the fused op."""
    return any(module.__dict__.get(FUSED_LOSS_ATTR, False) for module in model.modules())


class SFTTrainerPlugin:
    name = "sft"
    sample_kinds = ("conversation", "completion", "text", "segments")
    options_schema = None

    def create(self, request: TrainRequest) -> Any:
        from transformers import Trainer
        from trl import SFTConfig
        from trl.trainer.sft_trainer import SFTTrainer  # the class itself, whoever replaced trl.SFTTrainer

        class ModelLossSFTTrainer(SFTTrainer):
            """Takes the loss from the model's forward when a model adapter fused it
            (``linear_cross_entropy``); trl would otherwise compute its own from the hidden states.

            A mixture-of-experts forward adds ``router_aux_loss_coef * aux_loss`` (the load-balancing loss of
            its own micro-batch) as transformers' does. With ``num_items_in_batch`` the trainer scales the
            whole loss by the number of processes and sums it over the accumulated micro-batches, which is
            right for the token-summed cross-entropy but would weigh the aux term once per process and
            micro-batch: it is re-weighted here to their mean, as trl weighs it.
            """

            def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
                inputs["use_cache"] = False
                loss, outputs = Trainer.compute_loss(self, model, inputs, True, num_items_in_batch)
                aux = getattr(outputs, "aux_loss", None)
                if aux is not None and num_items_in_batch is not None:
                    coef = self.model.config.get_text_config().router_aux_loss_coef
                    scaled = self.args.average_tokens_across_devices and self.model_accepts_loss_kwargs
                    processes = self.accelerator.num_processes if scaled else 1
                    weighted = coef * aux.to(loss.device)
                    loss = loss - weighted * processes + weighted / self.current_gradient_accumulation_steps
                return (loss, outputs) if return_outputs else loss

        tokenizer = request.tokenizer
        args = trl_config(SFTConfig, request, dataset_kwargs={"skip_prepare_dataset": True}, packing=False)
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        trainer_class = ModelLossSFTTrainer if has_fused_loss(request.model) else SFTTrainer
        collator = request.data_collator or PadCollator(pad_id)
        return trainer_class(**trainer_inputs(request, args, data_collator=collator))
