"""orpo, kto, dpo's SimPO and grpo end to end on the demo model through the pipeline: the loss (or reward) moves
the right way, the trainers' metrics reach metrics.jsonl, and the exported adapter reloads with
peft; the --demo grpo wiring."""

from __future__ import annotations

import json

import pytest
import torch

from ftengine.core.config import validate_config
from ftengine.demo import ASSETS
from ftengine.demo import arithmetic_accuracy
from ftengine.demo import grpo_demo_config
from ftengine.demo import grpo_report
from ftengine.engine import pipeline
from ftengine.engine.loss_plot import panels

from .helpers import kto_file


def run_config(base, tmp_path, trainer, data, options, rows=8, **training):
    return validate_config({
        "model": {"name_or_path": str(base), "max_seq_length": 64, "dtype": "float32"},
        "lora": {"r": 8, "lora_alpha": 16},
        "data": {"path": str(data), "chat_template": "chatml", "max_rows": rows},
        "training": {"trainer": trainer, "trainer_options": options, "per_device_train_batch_size": 4,
                     "gradient_accumulation_steps": 1, "learning_rate": 3e-3, "lr_scheduler_type": "constant",
                     "logging_steps": 1, "save_steps": 100, "gradient_checkpointing": False, **training},
        "export": [{"format": "lora"}],
        "output": {"dir": str(tmp_path / "runs")},
    })


def metrics(result):
    return [json.loads(line) for line in (result.run_dir.path / "metrics.jsonl").read_text().splitlines()]


def reloads(base, result):
    """The exported adapter loads onto the base with peft and reproduces the trained model's logits."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    reloaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32),
                                         str(result.exports["lora"][0])).eval()
    ids = torch.tensor([[5, 17, 42, 99, 7]])
    result.model.eval()
    with torch.no_grad():
        return torch.allclose(reloaded(ids).logits, result.model(input_ids=ids).logits, atol=1e-4)


@pytest.mark.parametrize(("trainer", "options", "margin_key"), [
    ("orpo", {"beta": 0.2}, "log_odds_ratio"), ("kto", {"beta": 0.1}, "rewards/margins"),
    ("dpo", {"loss_type": "simpo", "beta": 2.0, "simpo_gamma": 0.5}, "rewards/margins"),
])
def test_preference_trainers_lower_their_loss_and_export(trainer, options, margin_key, demo_base, tmp_path):
    data = kto_file(tmp_path, rows=8) if trainer == "kto" else ASSETS / "preference.jsonl"
    result = pipeline.run(run_config(demo_base, tmp_path, trainer, data, options, max_steps=8))
    records = metrics(result)
    assert [m["step"] for m in records] == list(range(1, 9))
    losses = [m["loss"] for m in records]
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3, losses
    assert any(margin_key in m for m in records)
    report = json.loads((result.run_dir.path / "data_report.json").read_text())
    assert report["format"] == ("unpaired_preference" if trainer == "kto" else "preference")
    assert reloads(demo_base, result)


def grpo_config(base, tmp_path, steps, rows=8):
    config = grpo_demo_config()
    config.model.name_or_path = str(base)
    config.data.max_rows = rows
    config.training.max_steps = steps
    config.training.logging_steps = 1
    config.training.per_device_train_batch_size = 8
    config.training.trainer_options = {**config.training.trainer_options, "num_generations": 4, "beta": 0.04,
                                       "max_completion_length": 4}
    config.output.dir = str(tmp_path / "runs")
    return config


def test_grpo_run_records_its_metrics_and_exports(grpo_base, demo_base, tmp_path, capsys, caplog):
    from ftengine.cli import print_summary

    caplog.set_level("INFO", logger="ftengine")
    result = pipeline.run(grpo_config(demo_base, tmp_path, steps=2))
    assert "generation: static KV cache" in caplog.text
    records = metrics(result)
    curves = result.train.rewards
    assert set(curves) == {"reward", "format", "exact_match", "ftengine_demo_rewards_closeness"}
    assert curves["reward"] == [(m["step"], m["reward"]) for m in records]
    assert curves["exact_match"] == [(m["step"], m["rewards/exact_match/mean"]) for m in records]
    print_summary(result)
    (line,) = [row for row in capsys.readouterr().out.splitlines() if row.strip().startswith("reward ")]
    first, last = records[0]["reward"], records[-1]["reward"]
    assert f"{first:.2f} -> {last:.2f} (first -> last logged mean; format " in line and "exact_match" in line
    assert [m["step"] for m in records] == [1, 2]
    for key in ("reward", "reward_std", "kl", "completion_length", "rewards/exact_match/mean",
                "rewards/ftengine_demo_rewards_closeness/mean"):
        assert all(key in m for m in records), key
    assert all(0 < m["completion_length"] <= 4 for m in records)
    assert (result.run_dir.path / "loss.png").exists()
    drawn = panels(records)
    assert {"loss", "reward", "KL to the reference", "completion length"} <= drawn.keys()
    assert drawn["reward"][0].values == [m["reward"] for m in records]
    assert drawn["reward"][0].band == [m["reward_std"] for m in records]
    assert {c.label for c in drawn["reward"][1:]} == {"format", "exact_match", "ftengine_demo_rewards_closeness"}
    assert reloads(demo_base, result)


@pytest.mark.slow
def test_grpo_demo_learns_the_sums_it_was_not_shown(grpo_base, tmp_path):
    """The warm start answers in the format but rarely right; GRPO on the held-out sums raises both the
    sampled exact-match reward and the greedy accuracy."""
    from transformers import AutoModelForCausalLM
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(grpo_base))
    start = AutoModelForCausalLM.from_pretrained(str(grpo_base), dtype=torch.float32)
    before = arithmetic_accuracy(start, tokenizer)
    config = grpo_demo_config()
    config.training.max_steps = 60
    config.output.dir = str(tmp_path / "runs")
    result = pipeline.run(config)
    rewards = [m["rewards/exact_match/mean"] for m in metrics(result) if "rewards/exact_match/mean" in m]
    formats = [m["rewards/format/mean"] for m in metrics(result) if "rewards/format/mean" in m]
    assert min(formats) > 0.9, formats
    assert sum(rewards[-4:]) / 4 > sum(rewards[:2]) / 2 + 0.08, rewards
    after = arithmetic_accuracy(result.model, tokenizer)
    assert after >= before + 0.1
    report = grpo_report(result.exports["lora"][0])  # what `ftengine run --demo grpo` prints at the end
    assert f"{before:.0%} before GRPO, {after:.0%} with the trained adapter" in report


def test_grpo_refuses_a_batch_that_splits_a_group(demo_base, tmp_path):
    from ftengine.core.errors import ConfigError

    config = grpo_config(demo_base, tmp_path, steps=1)
    config.training.per_device_train_batch_size = 6
    with pytest.raises(ConfigError, match="num_generations: 4 does not divide the generation batch of 6"):
        pipeline.run(config)


def test_run_demo_grpo_option(monkeypatch, grpo_base):
    from .test_dpo import demo_run_configs

    (config,), stderr = demo_run_configs(monkeypatch, ["run", "--demo", "grpo"])
    assert "GRPO with LoRA" in stderr and "warmed up" in stderr
    assert config.training.trainer == "grpo" and config.data.path.endswith("arithmetic.jsonl")
    assert config.model.name_or_path == str(grpo_base)
    assert config.training.trainer_options["reward_funcs"][-1] == "ftengine.demo.rewards:closeness"


def test_grpo_warm_start_is_cached_and_answers_with_a_number(grpo_base):
    from ftengine.demo import grpo_base_dir
    from ftengine.plugins.trainers.rewards import final_answer

    built = (grpo_base / "model.safetensors").stat().st_mtime_ns
    assert grpo_base_dir() == grpo_base and (grpo_base / "model.safetensors").stat().st_mtime_ns == built
    from transformers import AutoModelForCausalLM
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(grpo_base))
    model = AutoModelForCausalLM.from_pretrained(str(grpo_base), dtype=torch.float32).eval()
    warmup = [json.loads(line) for line in (ASSETS / "arithmetic_warmup.jsonl").read_text().splitlines()]
    right = 0
    for row in warmup[:10]:
        ids = tokenizer.apply_chat_template(row["messages"][:-1], add_generation_prompt=True, return_tensors="pt",
                                            return_dict=True)
        with torch.no_grad():
            out = model.generate(**ids, max_new_tokens=4, do_sample=False, pad_token_id=tokenizer.pad_token_id,
                                 eos_token_id=tokenizer.eos_token_id)
        answer = tokenizer.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)
        assert final_answer(answer) is not None and answer.strip().isdigit(), answer
        right += answer.strip() == row["messages"][-1]["content"]
    assert right >= 5
