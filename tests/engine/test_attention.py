"""The attention implementation: auto resolved per device and packing, checked against the model class,
switched by the Python API for packed rows, named in the summary."""

import pytest
import torch

from ftengine.core.errors import ConfigError
from ftengine.engine import attention
from ftengine.engine import pipeline


@pytest.mark.parametrize(("requested", "packing", "cuda", "expected"), [
    ("auto", False, False, "sdpa"),
    ("auto", True, False, "sdpa"),  # FlexAttention has no backward on the CPU
    ("auto", False, True, "sdpa"),
    ("auto", True, True, "flex_attention"),
    ("sdpa", True, True, "sdpa"),
    ("eager", False, False, "eager"),
    ("flex_attention", False, False, "flex_attention"),
])
def test_auto_attention_is_flex_for_packed_rows_on_cuda(monkeypatch, requested, packing, cuda, expected):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    assert attention.resolve_attn_implementation(requested, packing) == expected


def test_auto_attention_keeps_to_what_the_model_class_implements(monkeypatch):
    from transformers import Gemma2Config
    from transformers import LlamaConfig

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert attention.supported_attn_implementations(LlamaConfig()) == ("sdpa", "flex_attention", "eager")
    gemma2 = attention.supported_attn_implementations(Gemma2Config())
    assert gemma2 == ("flex_attention", "eager")
    assert attention.resolve_attn_implementation("auto", False, gemma2) == "eager"
    assert attention.resolve_attn_implementation("auto", True, gemma2) == "flex_attention"
    assert attention.resolve_attn_implementation("auto", True, ("sdpa", "eager")) == "sdpa"
    with pytest.raises(ConfigError, match=r"model.attn_implementation: 'sdpa' is not implemented .*\(gemma2\); "
                                          r"use auto or one of: flex_attention, eager"):
        attention.choose_attn_implementation("sdpa", False, Gemma2Config())


def test_preflight_refuses_flex_attention_training_without_cuda(tiny_config, tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    config = tiny_config()
    config.model.attn_implementation = "flex_attention"
    with pytest.raises(ConfigError) as err:
        pipeline.run(config)
    assert str(err.value) == attention.FLEX_NEEDS_CUDA and "\n" not in str(err.value)
    assert "use sdpa, or auto" in str(err.value)
    assert not (tmp_path / "runs").exists()


def test_the_summary_names_the_attention_in_use(demo_base):
    from ftengine.core.config import validate_config

    for implementation, packing, note in [
        ("auto", False, "attention: sdpa (auto)"),
        ("auto", True, "attention: sdpa (auto; packed rows: a dense block-diagonal mask over each row)"),
        ("flex_attention", True, "attention: flex_attention (packed rows: a FlexAttention document mask, blocks "
                                 "across samples skipped)"),
    ]:
        config = validate_config({"model": {"name_or_path": str(demo_base), "dtype": "float32",
                                            "attn_implementation": implementation}, "data": {"packing": packing}})
        loaded = pipeline.load(config)
        assert loaded.notes[1] == note
        assert loaded.model.config._attn_implementation == note.split()[1]


def test_the_api_switches_an_auto_model_to_flex_for_packed_rows_on_cuda(demo_base, monkeypatch):
    import ftengine

    model, _ = ftengine.load_model(str(demo_base), dtype="float32")
    model = ftengine.add_lora(model, r=4, use_gradient_checkpointing=False)
    assert model.config._attn_implementation == "sdpa"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert attention.attention_for_rows(model, packed=False) == "sdpa"
    assert attention.attention_for_rows(model, packed=True) == "flex_attention"
    self_attn = model.base_model.model.model.layers[0].self_attn
    assert self_attn.config._attn_implementation == "flex_attention"  # what the patched attention dispatches on
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert attention.attention_for_rows(model, packed=False) == "sdpa"
    eager, _ = ftengine.load_model(str(demo_base), dtype="float32", attn_implementation="eager")
    assert attention.attention_for_rows(eager, packed=True) == "eager"  # an explicit choice is kept


def test_the_api_refuses_to_train_flex_attention_without_cuda(demo_base, tmp_path, monkeypatch):
    import ftengine
    from ftengine.demo import ASSETS

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match="load_model.attn_implementation: expected 'auto', 'sdpa'"):
        ftengine.load_model(str(demo_base), attn_implementation="flash")
    model, tokenizer = ftengine.load_model(str(demo_base), dtype="float32", attn_implementation="flex_attention")
    dataset = ftengine.load_dataset(str(ASSETS / "data.jsonl"), tokenizer, max_seq_length=64, max_rows=8,
                                    packing=True)
    with pytest.raises(ConfigError, match="flex_attention trains on a CUDA GPU only"):
        ftengine.train(model, tokenizer, dataset, max_steps=1, output_dir=str(tmp_path / "run"))
    assert not (tmp_path / "run").exists()
