"""The sft trainer takes the loss from the patched model (the fused linear_cross_entropy op)."""

import ftengine
from ftengine.plugins.kernels import reference


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
