"""The training stage's trainer setup: the flops estimate and the guard of a trainer its caller runs."""

import pytest
import torch
from transformers import Trainer
from transformers import TrainerCallback

import ftengine
from ftengine.core.errors import NonFiniteError
from ftengine.demo import ASSETS


def test_flops_are_transformers_estimate_with_the_parameters_counted_once(demo_base, tmp_path, monkeypatch):
    model, tokenizer = ftengine.load_model(str(demo_base), dtype="float32", load_in_4bit=False)
    model = ftengine.add_lora(model, r=4, lora_alpha=8, use_gradient_checkpointing=False)
    dataset = ftengine.load_dataset(str(ASSETS / "data.jsonl"), tokenizer, max_seq_length=64, max_rows=8)
    trainer = ftengine.make_trainer(model, tokenizer, dataset, max_steps=2, per_device_train_batch_size=4,
                                    gradient_accumulation_steps=1,
                                    output_dir=str(tmp_path / "run"), save_steps=100)
    batches = list(trainer.get_train_dataloader())
    expected = [Trainer.floating_point_ops(trainer, batch) for batch in batches]  # transformers' own estimate
    assert all(flops > 0 for flops in expected)
    counted = []
    count = type(model.get_base_model()).num_parameters
    monkeypatch.setattr(type(model.get_base_model()), "num_parameters",
                        lambda self, *a, **k: counted.append(1) or count(self, *a, **k))
    assert [trainer.floating_point_ops(batch) for batch in batches * 3] == expected * 3
    assert counted == []  # counted when the trainer was made, not per step
    assert trainer.floating_point_ops([{"prompt": "rows, as GRPO passes them"}]) == 0  # as transformers: no ids
    trainer.train()
    assert trainer.state.total_flos == sum(expected) and counted == []


def test_a_trainer_the_caller_runs_stops_at_a_nan_loss_with_an_error(demo_base, tmp_path):
    model, tokenizer = ftengine.load_model(str(demo_base), dtype="float32", load_in_4bit=False)
    model = ftengine.add_lora(model, r=4, lora_alpha=8, use_gradient_checkpointing=False)
    dataset = ftengine.load_dataset(str(ASSETS / "data.jsonl"), tokenizer, max_seq_length=64, max_rows=16)
    trainer = ftengine.make_trainer(model, tokenizer, dataset, max_steps=4, per_device_train_batch_size=4,
                                    gradient_accumulation_steps=1, output_dir=str(tmp_path / "run"), save_steps=100)
    forwards = []

    def nan_on_the_second_step(module, inputs, output):
        forwards.append(1)
        return output * float("nan") if len(forwards) == 2 else output

    model.get_base_model().model.norm.register_forward_hook(nan_on_the_second_step)
    after_step_1 = {}

    class Snapshot(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 1:
                after_step_1.update({n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n})

    trainer.add_callback(Snapshot())
    with pytest.raises(NonFiniteError, match="non-finite loss at step 2; training stopped"):
        trainer.train()
    # the bad step's update was never applied
    assert after_step_1 and all(torch.equal(p, after_step_1[n]) for n, p in model.named_parameters() if "lora_" in n)
