"""Run-config validation: every problem reported at once, each with its key path."""

import pytest

from ftengine.core.config import ConfigError
from ftengine.core.config import RunConfig
from ftengine.core.config import config_schema
from ftengine.core.config import load_config
from ftengine.core.config import validate_config

MINIMAL = {"model": {"name_or_path": "some/model"}, "data": {"path": "data.jsonl"}}


def problems(raw):
    with pytest.raises(ConfigError) as err:
        validate_config(raw, source="cfg.yaml")
    return str(err.value)


def test_defaults_work():
    config = validate_config(MINIMAL)
    assert isinstance(config, RunConfig)
    assert config.training.learning_rate == 2e-4
    assert config.lora.target_modules == "all-linear"
    assert [e.format for e in config.export] == ["lora", "merged"]


def test_unknown_key_suggests_the_closest():
    message = problems({**MINIMAL, "training": {"lerning_rate": 1e-4}})
    assert "training.lerning_rate: unknown key; did you mean training.learning_rate?" in message


def test_unknown_section_lists_sections():
    message = problems({**MINIMAL, "trainer": {}})
    assert "trainer: unknown key; did you mean training?" in message


def test_wrong_type_names_key_value_and_type():
    message = problems({**MINIMAL, "training": {"max_steps": "ten"}})
    assert "training.max_steps: expected an integer, got 'ten' (str)" in message


def test_a_key_with_a_line_break_or_no_characters_is_quoted_on_its_problems_line():
    message = problems({**MINIMAL, "data": {"path": "d.jsonl", "columns": {"\x1e\r": None, "": None}}})
    assert sorted(message.splitlines()[1:]) == ["  data.columns['']: expected a string, got None (NoneType)",
                                                "  data.columns['\\x1e\\r']: expected a string, got None (NoneType)"]


def test_union_choices_in_one_line():
    message = problems({**MINIMAL, "training": {"gradient_checkpointing": "sometimes"}})
    assert "training.gradient_checkpointing: expected true or false or 'offload' or 'auto', got 'sometimes'" in message


def test_attn_implementation_defaults_to_auto_and_lists_the_choices():
    assert validate_config(MINIMAL).model.attn_implementation == "auto"
    for value in ("sdpa", "flex_attention", "eager"):
        assert validate_config({**MINIMAL, "model": {**MINIMAL["model"], "attn_implementation": value}})
    message = problems({**MINIMAL, "model": {**MINIMAL["model"], "attn_implementation": "flex-attention"}})
    assert ("model.attn_implementation: expected 'auto', 'sdpa', 'flex_attention' or 'eager', got 'flex-attention' "
            "(str); did you mean 'flex_attention'?") in message
    message = problems({**MINIMAL, "model": {**MINIMAL["model"], "attn_implementation": "xformers"}})
    assert message.endswith("got 'xformers' (str)")


def test_all_problems_at_once():
    message = problems({"model": {}, "data": {"format": "nope", "train_on": "x"}, "training": {"lerning_rate": 1}})
    assert "4 problem(s)" in message
    assert "model.name_or_path: required key is missing" in message
    assert "data.format: 'nope' is not a registered format; choices: auto, " in message
    assert "data.train_on:" in message and "training.lerning_rate" in message


@pytest.mark.parametrize(("section", "key", "kind"), [
    ("data", "chat_template", "chat template"),
    ("training", "trainer", "trainer"),
    ("model", "adapter", "model"),
])
def test_unregistered_names_list_choices(section, key, kind):
    raw = {**MINIMAL, section: {**MINIMAL.get(section, {}), key: "nonexistent"}}
    message = problems(raw)
    assert f"{section}.{key}: 'nonexistent' is not a registered {kind}; choices:" in message


def test_exporter_options_validated_by_the_exporter():
    message = problems({**MINIMAL, "export": [{"format": "merged", "dtype": "int3", "max_shard": "1GB"},
                                              {"format": "zip"}]})
    assert "export[0].dtype: expected 'bfloat16', 'float16' or 'nf4', got 'int3'" in message
    assert "export[0].max_shard: unknown key; did you mean export[0].max_shard_size?" in message
    assert "export[1].format: 'zip' is not a registered exporter; choices:" in message


def test_exclusive_settings():
    message = problems({**MINIMAL, "quantization": {"load_in_4bit": True, "load_in_8bit": True}})
    assert "load_in_4bit and load_in_8bit are exclusive" in message


def test_yaml_errors(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  name_or_path: [unclosed\n")
    with pytest.raises(ConfigError, match=r"not valid YAML \(line \d+, column \d+\)"):
        load_config(bad)
    listy = tmp_path / "list.yaml"
    listy.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="expected a mapping of sections"):
        load_config(listy)


def test_schema_documents_every_key():
    schema = config_schema()
    for name, section in schema["$defs"].items():
        for key, spec in section.get("properties", {}).items():
            assert spec.get("description"), f"{name}.{key} has no description"
