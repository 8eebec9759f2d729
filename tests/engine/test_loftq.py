"""LoftQ initialisation: the base holds the NF4 / int8 round trip of each weight and the adapters start at the
best low-rank fit of what the quantization lost, checked against float64 computations done here."""

import pytest
import torch

import ftengine
from ftengine.core.errors import ConfigError
from ftengine.core.errors import ExportError
from ftengine.plugins.kernels.reference import _NF4_CODE

IDS = torch.tensor([[1, 17, 45, 300, 9, 77, 2, 5, 190, 33]])


def nf4_roundtrip(weight):
    """NF4 in float64: blocks of 64 consecutive elements, each scaled by its absmax to the nearest code."""
    flat = weight.double().reshape(-1, 64)
    absmax = flat.abs().amax(dim=1, keepdim=True).float().double()  # stored in float32
    code = torch.tensor(_NF4_CODE, dtype=torch.float64)
    nearest = (flat / absmax).unsqueeze(-1).sub(code).abs().argmin(-1)
    return (code[nearest] * absmax).reshape(weight.shape)


def best_low_rank(matrix, rank):
    u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
    return u[:, :rank] * s[:rank] @ vh[:rank]


def lora_layers(model):
    return {name: m for name, m in model.named_modules() if hasattr(m, "lora_A") and "default" in m.lora_A}


def delta(layer):
    a, b = layer.lora_A["default"].weight.double(), layer.lora_B["default"].weight.double()
    return layer.scaling["default"] * b @ a


def originals(model):
    return {name: p.detach().double().clone() for name, p in model.named_parameters()}


def test_loftq_nf4_fits_the_quantization_error(demo_base):
    model, _ = ftengine.load_model(str(demo_base), dtype="float32")
    before = originals(model)
    model = ftengine.add_lora(model, r=8, lora_alpha=16, init_lora_weights="loftq",
                              loftq_config={"loftq_bits": 4, "loftq_iter": 1}, use_gradient_checkpointing=False)
    layers = lora_layers(model)
    assert len(layers) == 4 * 7
    for name, layer in layers.items():
        weight = before[name.removeprefix("base_model.model.") + ".weight"]
        base = layer.get_base_layer().weight.double()
        quantized = nf4_roundtrip(weight)
        mismatched = (base - quantized).abs() > 1e-6
        assert mismatched.float().mean() < 1e-3, name  # a code chosen differently only at exact midpoints
        fit = best_low_rank(weight - base, 8)  # alpha 16 / r 8: the factors carry scaling 2
        assert (delta(layer) - fit).norm() < 1e-4 * fit.norm(), name
        assert (weight - base - delta(layer)).norm() < 0.97 * (weight - base).norm(), name  # Eckart-Young
    assert model.peft_config["default"].init_lora_weights == "loftq"
    # The whole model: closer to the unquantized one than the quantized base alone.
    reference, _ = ftengine.load_model(str(demo_base), dtype="float32")
    model.eval()
    with torch.no_grad():
        exact = reference(input_ids=IDS).logits
        with model.disable_adapter():
            quantized_only = model(input_ids=IDS).logits
        loftq = model(input_ids=IDS).logits
    assert (loftq - exact).norm() < (quantized_only - exact).norm()


def test_loftq_int8_iterations_rslora(demo_base):
    from peft import LoftQConfig

    model, _ = ftengine.load_model(str(demo_base), dtype="float32")
    before = originals(model)
    model = ftengine.add_lora(model, r=4, lora_alpha=8, use_rslora=True, target_modules=["q_proj", "down_proj"],
                              init_lora_weights="loftq", loftq_config=LoftQConfig(loftq_bits=8, loftq_iter=3),
                              use_gradient_checkpointing=False)
    assert model.peft_config["default"].loftq_config == {"loftq_bits": 8, "loftq_iter": 3}
    for name, layer in lora_layers(model).items():
        weight = before[name.removeprefix("base_model.model.") + ".weight"]
        base = layer.get_base_layer().weight.double()
        # Row-wise absmax int8: every row a whole multiple of its absmax / 127.
        steps = base / (base.abs().amax(dim=1, keepdim=True) / 127)
        assert (steps - steps.round()).abs().max() < 1e-3, name
        # The last iteration's adapter is the best rank-4 fit of what the final quantization lost.
        fit = best_low_rank(weight - base, 4)
        assert (delta(layer) - fit).norm() < 1e-4 * fit.norm(), name


def test_loftq_refusals(demo_base, tmp_path):
    from ftengine.core.config import validate_config

    quantized, _ = ftengine.load_model(str(demo_base), load_in_4bit=True)
    with pytest.raises(ConfigError, match="needs an unquantized base"):
        ftengine.add_lora(quantized, r=4, init_lora_weights="loftq")
    model, tokenizer = ftengine.load_model(str(demo_base), dtype="float32")
    with pytest.raises(ConfigError, match="only with init_lora_weights='loftq'"):
        ftengine.add_lora(model, r=4, loftq_config={"loftq_bits": 4})
    with pytest.raises(ConfigError, match=r"lora.loftq_config.loftq_bits"):
        ftengine.add_lora(model, r=4, init_lora_weights="loftq", loftq_config={"loftq_bits": 2})
    raw = {"model": {"name_or_path": str(demo_base)}, "quantization": {"load_in_4bit": True},
           "lora": {"init_lora_weights": "loftq", "loftq_config": {"loftq_iter": 2}, "use_dora": True}}
    with pytest.raises(ConfigError) as error:
        validate_config(raw)
    assert "needs an unquantized base" in str(error.value) and "loftq and lora.use_dora" in str(error.value)
    model = ftengine.add_lora(model, r=4, init_lora_weights="loftq", use_gradient_checkpointing=False)
    with pytest.raises(ExportError, match="rewrites the base weights"):
        ftengine.export(model, tokenizer, str(tmp_path / "lora"), format="lora")


def test_loftq_adapter_reloads_on_its_quantized_base(demo_base, tmp_path):
    model, _ = ftengine.load_model(str(demo_base), dtype="float32")
    model = ftengine.add_lora(model, r=4, lora_alpha=8, target_modules=["q_proj", "up_proj"],
                              init_lora_weights="loftq", loftq_config={"loftq_bits": 4, "loftq_iter": 2},
                              use_gradient_checkpointing=False)
    for name, p in model.named_parameters():  # as if trained: the adapters moved from their LoftQ start
        if "lora_B" in name:
            p.data += 0.01 * torch.randn_like(p)
    model.save_pretrained(str(tmp_path / "adapter"))  # peft's own files (the lora export refuses LoftQ)
    reloaded, _ = ftengine.load_model(str(tmp_path / "adapter"), dtype="float32")
    assert reloaded.peft_config["default"].loftq_config == {"loftq_bits": 4, "loftq_iter": 2}
    model.eval()
    reloaded.eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=IDS).logits, model(input_ids=IDS).logits, atol=1e-5, rtol=0)
