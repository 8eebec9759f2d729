"""The lora and merged exports reload in their real consumers (peft, transformers) and reproduce
the in-memory model's logits."""

import json

import pytest
import torch

import ftengine
from ftengine.core.errors import ExportError
from ftengine.plugins.exporters.merged_tensors import iter_merged_tensors


@pytest.fixture
def lora_model(demo_base):
    model, tokenizer = ftengine.load_model(str(demo_base), dtype="float32")
    model = ftengine.add_lora(model, r=4, lora_alpha=8, use_gradient_checkpointing=False)
    torch.manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.05)
    model.eval()
    return model, tokenizer


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


IDS = torch.tensor([[1, 17, 45, 300, 9, 77, 2, 5, 190, 33]])


def test_lora_export_reloads_with_peft(lora_model, demo_base, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model, tokenizer = lora_model
    out = ftengine.export(model, tokenizer, str(tmp_path / "lora"), format="lora")
    assert (out / "adapter_config.json").exists() and (out / "adapter_model.safetensors").exists()
    assert (out / "tokenizer.json").exists()
    base = AutoModelForCausalLM.from_pretrained(str(demo_base), dtype=torch.float32)
    reloaded = PeftModel.from_pretrained(base, str(out)).eval()
    torch.testing.assert_close(logits(reloaded, IDS), logits(model, IDS), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(("dtype", "atol"), [("float16", 2e-2), ("bfloat16", 1e-1)])
def test_merged_export_reloads_with_transformers(lora_model, tmp_path, dtype, atol):
    from transformers import AutoModelForCausalLM
    from transformers import AutoTokenizer

    model, tokenizer = lora_model
    out = ftengine.export(model, tokenizer, str(tmp_path / "merged"), format="merged", dtype=dtype,
                          max_shard_size="300KB")
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    assert not any("lora" in k or "base_layer" in k for k in index["weight_map"])
    reloaded = AutoModelForCausalLM.from_pretrained(str(out))
    assert reloaded.dtype == getattr(torch, dtype)
    assert "quantization_config" not in json.loads((out / "config.json").read_text())
    assert AutoTokenizer.from_pretrained(str(out)).chat_template == tokenizer.chat_template
    torch.testing.assert_close(logits(reloaded.float(), IDS), logits(model, IDS), atol=atol, rtol=0)
    assert not list(tmp_path.glob(".merged.partial-*"))


def test_existing_output_is_not_overwritten(lora_model, tmp_path):
    model, tokenizer = lora_model
    target = tmp_path / "out"
    target.mkdir()
    (target / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError):
        ftengine.export(model, tokenizer, str(target), format="lora")
    assert (target / "keep.txt").read_text() == "mine"


def test_full_model_has_no_lora_export(demo_base, tmp_path):
    model, tokenizer = ftengine.load_model(str(demo_base), dtype="float32", full_finetuning=True)
    with pytest.raises(ExportError, match="'lora' export needs a LoRA model"):
        ftengine.export(model, tokenizer, str(tmp_path / "x"), format="lora")
    assert not (tmp_path / "x").exists()


def test_qlora_merge_uses_the_original_16bit_weights(demo_base, tmp_path):
    """From a 4-bit base, the merged weights are original + delta, with no 4-bit rounding."""
    from safetensors.torch import load_file

    model, tokenizer = ftengine.load_model(str(demo_base), load_in_4bit=True)
    model = ftengine.add_lora(model, r=4, lora_alpha=8, use_gradient_checkpointing=False)
    layer = model.base_model.model.model.layers[0].mlp.down_proj
    with torch.no_grad():
        layer.lora_B["default"].weight.normal_(0, 0.05)
    delta = layer.get_delta_weight("default").float()
    out = ftengine.export(model, tokenizer, str(tmp_path / "merged"), format="merged", dtype="float16")
    merged = load_file(str(out / "model.safetensors"))
    original = load_file(str(demo_base / "model.safetensors"))
    name = "model.layers.0.mlp.down_proj.weight"
    expected = (original[name].float() + delta).half()
    torch.testing.assert_close(merged[name], expected, atol=1e-3, rtol=0)
    untouched = "model.layers.1.self_attn.q_proj.weight"
    lora_q = model.base_model.model.model.layers[1].self_attn.q_proj
    assert torch.allclose(lora_q.lora_B["default"].weight, torch.zeros(1))
    torch.testing.assert_close(merged[untouched], original[untouched].half(), atol=0, rtol=0)


def test_nf4_merged_export_loads_as_a_4bit_model(lora_model, tmp_path):
    """Merged then requantized to NF4: transformers loads it in 4 bits; its logits equal those of the 16-bit
    merged export quantized by transformers on load, and stay near the 16-bit merged model's (lossy)."""
    import bitsandbytes as bnb
    from transformers import AutoModelForCausalLM
    from transformers import BitsAndBytesConfig

    model, tokenizer = lora_model
    expected = logits(model, IDS)
    nf4_dir = ftengine.export(model, tokenizer, str(tmp_path / "nf4"), format="merged", dtype="nf4")
    bf16_dir = ftengine.export(model, tokenizer, str(tmp_path / "bf16"), format="merged", dtype="bfloat16")
    config = json.loads((nf4_dir / "config.json").read_text())["quantization_config"]
    assert config["load_in_4bit"] and config["bnb_4bit_quant_type"] == "nf4"

    loaded = AutoModelForCausalLM.from_pretrained(str(nf4_dir))
    layers = [m for m in loaded.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(layers) == 7 * loaded.config.num_hidden_layers  # q, k, v, o, gate, up, down; not the head
    reference = AutoModelForCausalLM.from_pretrained(
        str(bf16_dir), quantization_config=BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                              bnb_4bit_compute_dtype=torch.bfloat16))
    ours = logits(loaded, IDS)
    torch.testing.assert_close(ours, logits(reference, IDS), atol=1e-3, rtol=0)
    # lossy: each layer is the merged weight to NF4's precision (about 10% relative error per weight),
    # which on this tiny random model moves the logits by a fraction of their norm
    merged = dict(iter_merged_tensors(model, torch.float32))
    layer = loaded.model.layers[0].mlp.down_proj
    weight = bnb.functional.dequantize_4bit(layer.weight.data, layer.weight.quant_state).float()
    target = merged["model.layers.0.mlp.down_proj.weight"]
    assert float((weight - target).norm() / target.norm()) < 0.12
    assert float((ours - expected).norm() / expected.norm()) < 0.6
