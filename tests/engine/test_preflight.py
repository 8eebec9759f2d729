"""The preflight: every problem found before the model loads, reported at once, no run directory."""

import json
import shutil

import pytest

from ftengine.core.errors import ConfigError
from ftengine.core.errors import DataError
from ftengine.engine import pipeline
from ftengine.engine import preflight


def test_every_problem_at_once_and_no_run_directory(tiny_config, tmp_path):
    config = tiny_config()
    config.training.lr_scheduler_type = "cosine_with_typo"
    config.training.optim = "adamw_fast"
    config.lora.target_modules = ["q_proj", "qkv_proj"]
    bad = tmp_path / "data.txt"
    bad.write_text("hello\n")
    config.data.path = str(bad)
    latin1 = tmp_path / "eval.jsonl"
    latin1.write_bytes(b'{"text": "ok"}\n{"text": "caf\xe9"}\n')
    config.data.eval_path = str(latin1)
    with pytest.raises(ConfigError) as err:
        pipeline.run(config)
    lines = str(err.value).splitlines()
    assert lines[0] == "the run cannot start: 5 problems:"
    text = str(err.value)
    assert "training.lr_scheduler_type: 'cosine_with_typo' is not a transformers name" in text and "cosine" in text
    assert "training.optim: 'adamw_fast' is not a transformers name" in text and "adamw_torch" in text
    assert "lora.target_modules: 'qkv_proj' match no module of this qwen2 model" in text and "q_proj" in text
    assert f"{bad}: unknown data file extension '.txt'" in text
    assert f"{latin1}: line 2: not UTF-8 text (byte 0xe9" in text
    assert not (tmp_path / "runs").exists()


def test_the_demo_config_passes(tiny_config):
    assert preflight.check(tiny_config()) == []


def test_warmup_longer_than_the_run_is_warned(tiny_config, caplog):
    assert "never reaches" in preflight.check(tiny_config(warmup_steps=10))[0]


@pytest.fixture
def model_copy(demo_base, tmp_path):
    copy = tmp_path / "model"
    shutil.copytree(demo_base, copy)
    return copy


def test_pickle_weights_are_refused_unless_allowed(tiny_config, model_copy):
    for weights in model_copy.glob("*.safetensors"):
        weights.rename(weights.with_name("pytorch_model.bin"))
    config = tiny_config()
    config.model.name_or_path = str(model_copy)
    with pytest.raises(ConfigError, match=r"pytorch_model.bin: weights in a pickle file.*model.allow_pickle: true"):
        preflight.check(config)
    config.model.allow_pickle = True
    preflight.check(config)


def test_a_model_directory_without_tokenizer_files(tiny_config, model_copy):
    for name in preflight.TOKENIZER_FILES:
        (model_copy / name).unlink(missing_ok=True)
    config = tiny_config()
    config.model.name_or_path = str(model_copy)
    with pytest.raises(ConfigError, match="no tokenizer files"):
        preflight.check(config)


def test_a_model_that_is_not_a_causal_lm(tiny_config, model_copy):
    (model_copy / "config.json").write_text(json.dumps({"model_type": "vit", "hidden_size": 32}))
    config = tiny_config()
    config.model.name_or_path = str(model_copy)
    with pytest.raises(ConfigError, match="a 'vit' model is not a causal language model"):
        preflight.check(config)


def test_remote_code_names_trust_remote_code(tiny_config, model_copy):
    hf = json.loads((model_copy / "config.json").read_text())
    hf.update(model_type="mystery", auto_map={"AutoConfig": "modeling_mystery.MysteryConfig"})
    (model_copy / "config.json").write_text(json.dumps(hf))
    config = tiny_config()
    config.model.name_or_path = str(model_copy)
    with pytest.raises(ConfigError, match="model.trust_remote_code: true"):
        preflight.check(config)


def test_output_dir_that_is_a_file(tiny_config, tmp_path):
    config = tiny_config()
    config.output.dir = str(tmp_path / "file")
    (tmp_path / "file").write_text("")
    with pytest.raises(ConfigError, match="output.dir: .* is a file, not a directory"):
        preflight.check(config)


def test_deeply_nested_json_is_one_clear_row_error(tmp_path):
    from ftengine.core.config import DataConfig
    from ftengine.engine.data import DataReport
    from ftengine.engine.data import load_samples

    path = tmp_path / "deep.jsonl"
    path.write_text('{"text": ' + "[" * 100000 + "]" * 100000 + "}\n")
    with pytest.raises(DataError, match="deep.jsonl: line 1: JSON nested too deeply"):
        load_samples(str(path), DataConfig(path=str(path), format="text"), DataReport())


def test_exporters_check_the_run_before_it_trains(tiny_config, tmp_path, monkeypatch):
    import dataclasses

    from ftengine.core.config import ExportEntry
    from ftengine.core.plugins import adapter_for_model_type
    from ftengine.core.plugins import registries

    qwen2 = adapter_for_model_type("qwen2")  # as an architecture without a GGUF layout:
    monkeypatch.setattr(registries().entries["models"][qwen2.name], "obj", dataclasses.replace(qwen2, gguf=None))
    config = tiny_config()
    config.lora.init_lora_weights = "pissa"
    config.export = [ExportEntry(format="merged"), ExportEntry(format="gguf", chat_template="no-such-template"),
                     ExportEntry(format="lora")]
    with pytest.raises(ConfigError) as err:
        pipeline.run(config)
    lines = str(err.value).splitlines()[1:]
    assert len(lines) == 3
    assert lines[0].strip().startswith("export[1] (gguf): cannot export model type 'qwen2' to GGUF; supported: ")
    assert "llama" in lines[0]
    assert lines[1].strip().startswith("export[1] (gguf): chat_template: no chat template named 'no-such-template'")
    assert lines[2].strip().startswith("export[2] (lora): init_lora_weights='pissa' rewrites the base weights")
    assert not (tmp_path / "runs").exists()


MOE_CONFIG = {"model_type": "qwen3_moe", "vocab_size": 640, "hidden_size": 64, "intermediate_size": 96,
              "moe_intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 4, "num_key_value_heads": 2,
              "head_dim": 16, "num_experts": 4, "num_experts_per_tok": 2}


@pytest.mark.parametrize(("targets", "refused"), [("all-linear", True), (["q_proj", "v_proj"], False)])
def test_lora_dropout_on_fused_experts_is_a_config_error(tiny_config, model_copy, targets, refused):
    """peft cannot put dropout on the 3-D expert weights it adapts in place: said before loading, naming the key;
    dropout on the attention only stays allowed."""
    (model_copy / "config.json").write_text(json.dumps(MOE_CONFIG))
    config = tiny_config()
    config.model.name_or_path = str(model_copy)
    config.lora.lora_dropout = 0.1
    config.lora.target_modules = targets
    if not refused:
        preflight.check(config)
        return
    with pytest.raises(ConfigError, match=r"lora.lora_dropout: 0.1 cannot apply to this qwen3_moe model's fused "
                                          r"mixture-of-experts weights.*set lora.lora_dropout: 0"):
        preflight.check(config)


def test_expert_names_peft_maps_onto_fused_experts_pass(tiny_config, model_copy):
    """``gate_proj`` / ``up_proj`` / ``down_proj`` name no module of a transformers 5 Qwen3-MoE, but peft maps them
    onto the fused experts: accepted; a name peft cannot map still fails."""
    (model_copy / "config.json").write_text(json.dumps(MOE_CONFIG))
    config = tiny_config()
    config.model.name_or_path = str(model_copy)
    config.lora.target_modules = ["q_proj", "gate_proj", "up_proj", "down_proj"]
    preflight.check(config)
    config.lora.target_modules = ["q_proj", "gate_projj"]
    with pytest.raises(ConfigError, match="'gate_projj' match no module of this qwen3_moe model"):
        preflight.check(config)


def test_static_generation_for_a_vision_model_is_refused_before_loading(tiny_config, model_copy):
    from tests.plugins.models.vision_helpers import qwen_vl_config

    qwen_vl_config().save_pretrained(str(model_copy))  # the architecture is all the preflight reads
    config = tiny_config()
    config.model.name_or_path = str(model_copy)
    config.training.trainer_options = {"generation_backend": "static"}
    with pytest.raises(ConfigError, match="generation_backend: static cannot serve this model: inputs other than "
                                          r"token ids \(a vision model\); use auto or transformers"):
        preflight.check(config)
    config.training.trainer_options = {"generation_backend": "auto"}  # hands such a model to transformers
    assert preflight.check(config) == []
