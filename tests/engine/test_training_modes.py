"""Training modes through the Python API: 8-bit base, rsLoRA, DoRA, PiSSA, full fine-tuning."""

import math

import pytest
import torch

import ftengine

IDS = torch.tensor([[1, 17, 45, 300, 9, 77, 2, 5, 190, 33]])


def train_steps(model, tokenizer, tmp_path, steps=2):
    from ftengine.demo import ASSETS

    dataset = ftengine.load_dataset(str(ASSETS / "data.jsonl"), tokenizer, max_seq_length=64, max_rows=16)
    return ftengine.train(model, tokenizer, dataset, max_steps=steps, per_device_train_batch_size=4,
                          gradient_accumulation_steps=1, learning_rate=1e-3, gradient_checkpointing=False,
                          output_dir=str(tmp_path / "run"), save_steps=100)


def lora_b_norm(model):
    return sum(p.norm().item() for n, p in model.named_parameters() if "lora_B" in n)


def test_8bit_base_trains(demo_base, tmp_path):
    model, tokenizer = ftengine.load_model(str(demo_base), load_in_8bit=True)
    assert getattr(model, "is_loaded_in_8bit", False)
    model = ftengine.add_lora(model, r=4, lora_alpha=8, use_gradient_checkpointing=False)
    result = train_steps(model, tokenizer, tmp_path)
    assert result.steps == 2 and math.isfinite(result.last_loss)
    assert lora_b_norm(model) > 0


def test_rslora_scaling(demo_base):
    model, _ = ftengine.load_model(str(demo_base), dtype="float32")
    model = ftengine.add_lora(model, r=16, lora_alpha=32, use_rslora=True, use_gradient_checkpointing=False)
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    assert layer.scaling["default"] == pytest.approx(32 / math.sqrt(16))


@pytest.mark.parametrize("options", [{"use_dora": True}, {"init_lora_weights": "pissa"}])
def test_dora_and_pissa_train_and_merge(demo_base, tmp_path, options):
    from transformers import AutoModelForCausalLM

    model, tokenizer = ftengine.load_model(str(demo_base), dtype="float32")
    model = ftengine.add_lora(model, r=4, lora_alpha=8, use_gradient_checkpointing=False, **options)
    train_steps(model, tokenizer, tmp_path)
    model.eval()
    with torch.no_grad():
        expected = model(input_ids=IDS).logits
    out = ftengine.export(model, tokenizer, str(tmp_path / "merged"), format="merged", dtype="float16")
    merged = AutoModelForCausalLM.from_pretrained(str(out)).float().eval()
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=IDS).logits, expected, atol=3e-2, rtol=0)


def test_full_finetuning_trains_every_weight(demo_base, tmp_path):
    model, tokenizer = ftengine.load_model(str(demo_base), dtype="float32", full_finetuning=True)
    before = model.model.layers[0].mlp.down_proj.weight.detach().clone()
    train_steps(model, tokenizer, tmp_path)
    assert all(p.requires_grad for p in model.parameters())
    assert not torch.equal(before, model.model.layers[0].mlp.down_proj.weight)


def test_pissa_adapter_alone_is_refused(demo_base, tmp_path):
    from ftengine.core.errors import ExportError

    model, tokenizer = ftengine.load_model(str(demo_base), dtype="float32")
    model = ftengine.add_lora(model, r=4, init_lora_weights="pissa", use_gradient_checkpointing=False)
    with pytest.raises(ExportError, match="rewrites the base weights"):
        ftengine.export(model, tokenizer, str(tmp_path / "lora"), format="lora")
    assert not (tmp_path / "lora").exists()


def test_data_helpers_in_the_api():
    rows = [{"conversations": [{"from": "human", "value": f"q{i}"}, {"from": "gpt", "value": f"a{i}"}]}
            for i in range(6)]
    messages = ftengine.standardize_sharegpt(rows)
    assert messages[0]["messages"] == [{"role": "user", "content": "q0"}, {"role": "assistant", "content": "a0"}]
    stitched = ftengine.conversation_extension(messages, n=3, seed=1)
    assert stitched == ftengine.conversation_extension(messages, n=3, seed=1)
    assert len(stitched[0]["messages"]) == 6
