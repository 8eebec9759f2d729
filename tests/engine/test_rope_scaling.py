"""``model.rope_scaling``: the context arithmetic transformers expects, the config it validates, the Python
API and the run path, and exports that carry the scaling (merged config.json, GGUF keys)."""

from __future__ import annotations

import json

import pytest
from transformers import Gemma3TextConfig
from transformers import Phi3Config
from transformers import Qwen3Config

from ftengine.core.config import validate_config
from ftengine.core.errors import ConfigError
from ftengine.engine import pipeline
from ftengine.engine.rope_scaling import apply_rope_scaling


def qwen3(**overrides) -> Qwen3Config:
    return Qwen3Config(**{"max_position_embeddings": 32768, "rope_theta": 1e6, **overrides})


def test_yarn_extends_the_context_from_the_original():
    cfg = qwen3()
    note = apply_rope_scaling(cfg, {"rope_type": "yarn", "factor": 4.0, "beta_fast": None})
    assert note == "rope scaling: yarn x4, context 32768 -> 131072 tokens"
    assert cfg.max_position_embeddings == 131072
    assert cfg.rope_parameters == {"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e6,
                                   "original_max_position_embeddings": 32768}


def test_an_explicit_original_context_sets_the_new_one():
    cfg = qwen3(max_position_embeddings=40960)
    apply_rope_scaling(cfg, {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768})
    assert cfg.max_position_embeddings == 131072
    assert cfg.rope_parameters["original_max_position_embeddings"] == 32768


def test_linear_llama3_and_dynamic():
    linear = qwen3()
    apply_rope_scaling(linear, {"rope_type": "linear", "factor": 2.0})
    assert linear.max_position_embeddings == 65536
    assert "original_max_position_embeddings" not in linear.rope_parameters
    llama3 = qwen3()
    apply_rope_scaling(llama3, {"rope_type": "llama3", "factor": 8.0})
    assert llama3.rope_parameters["low_freq_factor"] == 1.0 and llama3.rope_parameters["high_freq_factor"] == 4.0
    assert llama3.rope_parameters["original_max_position_embeddings"] == 32768
    dynamic = qwen3()
    apply_rope_scaling(dynamic, {"rope_type": "dynamic", "factor": 2.0})
    assert dynamic.max_position_embeddings == 32768  # where dynamic NTK starts growing the base
    assert dynamic.rope_parameters["rope_type"] == "dynamic"


def test_longrope_sets_phi3s_own_original_context():
    cfg = Phi3Config(hidden_size=32, num_attention_heads=4, max_position_embeddings=4096)
    apply_rope_scaling(cfg, {"rope_type": "longrope", "factor": 32.0, "short_factor": [1.0] * 4,
                             "long_factor": [2.0] * 4})
    assert cfg.max_position_embeddings == 131072
    assert cfg.original_max_position_embeddings == 4096
    assert cfg.rope_parameters["original_max_position_embeddings"] == 4096


def test_a_config_already_scaled_is_left_alone():
    cfg = qwen3()
    apply_rope_scaling(cfg, {"rope_type": "yarn", "factor": 4.0})
    again = apply_rope_scaling(cfg, {"rope_type": "yarn", "factor": 4.0})
    assert again == "rope scaling: yarn already in the model's config"
    assert cfg.max_position_embeddings == 131072
    assert apply_rope_scaling(cfg, None) is None


def test_per_layer_type_rope_scales_the_global_layers():
    cfg = Gemma3TextConfig(max_position_embeddings=32768)
    local = dict(cfg.rope_parameters["sliding_attention"])
    apply_rope_scaling(cfg, {"rope_type": "linear", "factor": 8.0})
    assert cfg.rope_parameters["full_attention"]["rope_type"] == "linear"
    assert cfg.rope_parameters["full_attention"]["factor"] == 8.0
    assert cfg.rope_parameters["sliding_attention"] == local


def test_transformers_rejections_are_config_errors():
    cfg = Phi3Config(hidden_size=32, num_attention_heads=4)
    with pytest.raises(ConfigError, match="model.rope_scaling: transformers rejects"):
        apply_rope_scaling(cfg, {"rope_type": "yarn", "factor": 2.0})  # Phi-3 takes longrope only


@pytest.mark.parametrize("scaling, problem", [
    ({"rope_type": "yarn"}, "model.rope_scaling.factor: required for rope_type yarn"),
    ({"rope_type": "linear", "factor": 2, "beta_fast": 32}, "model.rope_scaling.beta_fast: not used by rope_type "
                                                             "linear (it reads factor)"),
    ({"rope_type": "longrope", "short_factor": [1.0], "long_factor": [1.0, 2.0]},
     "model.rope_scaling: short_factor and long_factor must have the same length"),
    ({"rope_type": "ntk", "factor": 2}, "model.rope_scaling.rope_type: expected 'linear', 'dynamic', 'yarn'"),
])
def test_the_run_config_checks_the_keys_of_each_type(scaling, problem):
    with pytest.raises(ConfigError, match="1 problem") as error:
        validate_config({"model": {"name_or_path": "x", "rope_scaling": scaling}})
    assert problem in str(error.value)


def test_load_model_scales_and_the_exports_carry_it(demo_base, tmp_path):
    """The Python API loads the demo model with YaRN (a run's ``model.rope_scaling`` goes the same way,
    through the load stage); the merged export's config.json and the GGUF's keys carry it."""
    import gguf

    import ftengine

    original = json.loads((demo_base / "config.json").read_text())["max_position_embeddings"]
    model, tokenizer = ftengine.load_model(str(demo_base), dtype="float32",
                                           rope_scaling={"rope_type": "yarn", "factor": 4.0})
    assert model.config.max_position_embeddings == 4 * original
    assert model.model.rotary_emb.attention_scaling > 1.0  # yarn's cos/sin scale: the rotary module has it
    ftengine.export(model, tokenizer, str(tmp_path / "merged"), format="merged")
    saved = json.loads((tmp_path / "merged" / "config.json").read_text())
    params = saved.get("rope_parameters") or saved["rope_scaling"]
    assert (params["rope_type"], params["factor"], params["original_max_position_embeddings"]) == ("yarn", 4.0,
                                                                                                   original)
    assert saved["max_position_embeddings"] == 4 * original
    ftengine.export(model, tokenizer, str(tmp_path / "gguf"), format="gguf", quantization="f16")
    fields = gguf.GGUFReader(next((tmp_path / "gguf").glob("*.gguf"))).fields
    assert fields["qwen2.rope.scaling.type"].contents() == "yarn"
    assert fields["qwen2.rope.scaling.factor"].contents() == 4.0
    assert fields["qwen2.rope.scaling.original_context_length"].contents() == original
    assert fields["qwen2.context_length"].contents() == 4 * original


def test_the_load_stage_notes_the_scaling(demo_base):
    config = validate_config({"model": {"name_or_path": str(demo_base), "dtype": "float32",
                                        "rope_scaling": {"rope_type": "linear", "factor": 2.0}}})
    loaded = pipeline.load(config)
    assert loaded.notes[-1].startswith("rope scaling: linear x2, context ")
    assert loaded.model.config.rope_parameters["factor"] == 2.0
