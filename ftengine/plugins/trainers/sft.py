"""The ``sft`` trainer: supervised fine-tuning on trl's SFTTrainer, over rows the core's data
stage already tokenized with labels masked to the trained tokens (assistant turns by default),
and packed when ``data.packing`` is on (:class:`PadCollator` batches both kinds)."""

from __future__ import annotations

from typing import Any

from ftengine.core.types import TrainRequest
from ftengine.plugins.trainers.arguments import common_arguments
from ftengine.plugins.trainers.collator import PadCollator


class SFTTrainerPlugin:
    name = "sft"
    sample_kinds = ("conversation", "completion", "text")

    def create(self, request: TrainRequest) -> Any:
        from trl import SFTConfig
        from trl import SFTTrainer

        tokenizer = request.tokenizer
        args = SFTConfig(
            **common_arguments(request.training, str(request.output_dir), request.model),
            dataset_kwargs={"skip_prepare_dataset": True},
            packing=False,
        )
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        return SFTTrainer(
            model=request.model,
            args=args,
            train_dataset=request.train_dataset,
            eval_dataset=request.eval_dataset,
            processing_class=tokenizer,
            data_collator=PadCollator(pad_id),
            callbacks=request.callbacks,
        )
