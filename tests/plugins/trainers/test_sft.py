"""The sft trainer takes the loss from the patched model (the fused linear_cross_entropy op), with a
mixture of experts' load-balancing loss weighed once an optimizer step."""

import pytest

import ftengine
from ftengine.engine import pipeline
from ftengine.plugins.kernels import reference
from tests.plugins.models.moe_helpers import tiny_qwen3_moe_checkpoint


def test_sft_trains_through_the_fused_loss(demo_base, tmp_path, monkeypatch):
    from ftengine.demo import ASSETS

    calls = []
    original = reference.linear_cross_entropy

    def counting(*args, **kwargs):
        calls.append(args[0].shape)
        return original(*args, **kwargs)

    monkeypatch.setattr(reference.ReferenceBackend, "linear_cross_entropy", staticmethod(counting))
    model, tokenizer = ftengine.load_model(str(demo_base), dtype="float32")
    model = ftengine.add_lora(model, r=4, use_gradient_checkpointing=False)
    dataset = ftengine.load_dataset(str(ASSETS / "data.jsonl"), tokenizer, max_seq_length=64, max_rows=8)
    result = ftengine.train(model, tokenizer, dataset, max_steps=2, per_device_train_batch_size=4,
                            gradient_accumulation_steps=1, gradient_checkpointing=False, save_steps=100,
                            output_dir=str(tmp_path / "run"))
    assert result.steps == 2
    assert len(calls) == 2


def test_moe_aux_loss_counts_once_a_step_whatever_the_accumulation(make_tiny_run_config, tmp_path):
    """A mixture of experts trains with its router loss (trl turns it on, at the config's coefficient). Two
    accumulated micro-batches of 2 give the loss curve of one micro-batch of 4: the router loss is the mean
    of the micro-batches' (its nonlinearity in the batch is all that differs), not their sum (that would
    add ``router_aux_loss_coef`` x ~2 to every step)."""
    from ftengine.demo import ASSETS

    base = tiny_qwen3_moe_checkpoint(tmp_path / "moe")
    curves = []
    for micro, accumulation in ((4, 1), (2, 2)):
        config = make_tiny_run_config(base, ASSETS / "data.jsonl", tmp_path / f"run{accumulation}", max_steps=4,
                                      per_device_train_batch_size=micro, gradient_accumulation_steps=accumulation)
        result = pipeline.run(config)
        assert any("moe experts" in note for note in result.notes), result.notes
        curves.append([loss for _, loss in result.train.losses])
    one, accumulated = curves
    assert len(one) == len(accumulated) == 4
    assert accumulated == pytest.approx(one, abs=3e-4)
