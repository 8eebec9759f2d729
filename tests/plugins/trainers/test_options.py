"""Trainers own their options: ``training.trainer_options`` validated against each trainer's
schema (with key paths), the older ``training.beta`` moved there with a deprecation warning, a
third-party trainer adding its own keys, and ``ftengine config-schema`` listing every trainer's."""

from __future__ import annotations

import json

import pydantic
import pytest

import ftengine
from ftengine.core import plugins
from ftengine.core.config import ConfigError
from ftengine.core.config import trainer_options
from ftengine.core.config import validate_config

BASE = {"model": {"name_or_path": "some/model"}, "data": {"path": "data.jsonl"}}


def config(training):
    return validate_config({**BASE, "training": training}, source="cfg.yaml")


def problems(training):
    with pytest.raises(ConfigError) as err:
        config(training)
    return str(err.value)


def test_dpo_options_reach_the_trainer_as_its_schema():
    options = trainer_options(config({"trainer": "dpo", "trainer_options": {"beta": 0.3, "loss_type": "ipo"}}).training)
    assert type(options).__name__ == "DPOOptions" and options.beta == 0.3 and options.loss_type == "ipo"
    assert trainer_options(config({"trainer": "sft"}).training) is None


def test_bad_options_are_reported_with_their_key_path():
    message = problems({"trainer": "kto", "trainer_options": {"desirable_wieght": 2.0, "beta": -1}})
    assert "training.trainer_options.desirable_wieght: unknown key; did you mean " \
           "training.trainer_options.desirable_weight?" in message
    assert "training.trainer_options.beta: expected" in message
    assert "training.trainer_options.loss_type: expected" in problems({"trainer": "grpo", "trainer_options": {
        "reward_funcs": ["format"], "loss_type": "ppo"}})
    assert "training.trainer_options.reward_funcs: required key is missing" in problems({"trainer": "grpo"})
    assert "trainer 'sft' takes no options" in problems({"trainer": "sft", "trainer_options": {"beta": 0.1}})


def test_training_beta_still_works_with_a_deprecation_warning():
    with pytest.warns(DeprecationWarning, match="training.beta is deprecated: write it as "
                                                "training.trainer_options.beta"):
        cfg = config({"trainer": "dpo", "beta": 0.2, "loss_type": "hinge"})
    assert cfg.training.trainer_options == {"beta": 0.2, "loss_type": "hinge"}
    assert "training.beta and training.trainer_options.beta are both set" in problems(
        {"trainer": "dpo", "beta": 0.2, "trainer_options": {"beta": 0.3}})


class AlphaOptions(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(extra="forbid")
    alpha: float = pydantic.Field(0.5, description="How much.")


class AlphaTrainer:
    name = "alpha"
    sample_kinds = ("conversation",)
    options_schema = AlphaOptions

    def create(self, request):
        raise AssertionError("not run here")


class AlphaPlugin:
    @ftengine.hookimpl
    def register_trainers(self, register):
        register(AlphaTrainer())


@pytest.fixture
def alpha_trainer():
    regs = plugins.registries()
    assert regs.add_plugin(AlphaPlugin(), name="alpha-plugin").ok
    yield
    regs.remove_plugin("alpha-plugin")


def test_a_third_party_trainer_adds_its_keys_without_touching_the_core(alpha_trainer):
    assert trainer_options(config({"trainer": "alpha", "trainer_options": {"alpha": 0.9}}).training).alpha == 0.9
    assert "training.trainer_options.alpah: unknown key; did you mean training.trainer_options.alpha?" in problems(
        {"trainer": "alpha", "trainer_options": {"alpah": 1}})
    from click.testing import CliRunner

    from ftengine.cli import main

    schema = json.loads(CliRunner().invoke(main, ["config-schema"]).output)
    assert schema["x-trainer-options"]["alpha"]["properties"]["alpha"]["description"] == "How much."


def test_config_schema_lists_every_first_party_trainers_options():
    from ftengine.core.config import config_schema

    options = config_schema()["x-trainer-options"]
    assert {"sft", "dpo", "orpo", "kto", "grpo"} <= set(options)
    assert {"num_generations", "max_completion_length", "temperature", "epsilon", "loss_type", "beta",
            "reward_funcs"} <= set(options["grpo"]["properties"])
    assert {"beta", "desirable_weight", "undesirable_weight"} <= set(options["kto"]["properties"])
    assert "trainer_options" in config_schema()["$defs"]["TrainingConfig"]["properties"]


def test_the_python_api_splits_trainer_options_from_training_keys(monkeypatch, tmp_path):
    from ftengine.engine import attention
    from ftengine.engine import pipeline

    seen = {}

    def fake_train(model, tokenizer, dataset, eval_dataset, training, run_dir, resume_from, **kwargs):
        seen["training"] = training

    monkeypatch.setattr(pipeline, "train", fake_train)
    monkeypatch.setattr(attention, "attention_for_rows", lambda model, packed: "sdpa")
    from transformers import AutoTokenizer

    from ftengine.demo import ASSETS

    tokenizer = AutoTokenizer.from_pretrained(str(ASSETS / "tokenizer"))
    pairs = [{"prompt": "Hi", "chosen": "Hello.", "rejected": "Go away."}]
    ftengine.train(None, tokenizer, pairs, trainer="dpo", beta=0.4, max_steps=3, output_dir=str(tmp_path / "run"))
    assert seen["training"].max_steps == 3 and seen["training"].trainer_options == {"beta": 0.4}
    with pytest.raises(ConfigError, match="training.trainer_options.bta: unknown key; did you mean"):
        trainer_options(seen["training"].model_copy(update={"trainer_options": {"bta": 1}}))
