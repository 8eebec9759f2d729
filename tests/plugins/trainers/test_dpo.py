"""The ``dpo`` trainer end to end on the demo model: rewards logged and the chosen-vs-rejected margin
rising, the adapter trained against the adapter-disabled reference, from the pipeline, the CLI
demo wiring and the Python API (LoRA and full fine-tuning)."""

from __future__ import annotations

import json

import pytest
import torch

import ftengine
from ftengine.core.errors import DataError
from ftengine.demo import ASSETS
from ftengine.demo import demo_config
from ftengine.engine import pipeline
from ftengine.engine.conversational_rows import preference_rows
from ftengine.engine.data import DataReport
from ftengine.engine.data import encode_completion
from ftengine.plugins.trainers.dpo import DPOTrainerPlugin
from ftengine.plugins.trainers.dpo import frozen_copy


@pytest.fixture
def trainers(monkeypatch):
    """Every DPO trainer the plugin creates, to read its log history."""
    created = []
    original = DPOTrainerPlugin.create

    def create(self, request):
        created.append(original(self, request))
        return created[-1]

    monkeypatch.setattr(DPOTrainerPlugin, "create", create)
    return created


def lora_b(model):
    return {name: p.detach().clone() for name, p in model.named_parameters() if "lora_B" in name}


def test_dpo_run_raises_the_reward_margin(demo_base, tmp_path, trainers):
    config = demo_config("dpo")
    config.model.name_or_path = str(demo_base)
    config.model.max_seq_length = 64
    config.lora.r, config.lora.lora_alpha = 8, 16
    config.data.max_rows = 32
    config.training.max_steps = 24
    config.training.learning_rate = 3e-3
    config.training.logging_steps = 1
    config.output.dir = str(tmp_path / "runs")
    result = pipeline.run(config)

    (trainer,) = trainers
    logs = [entry for entry in trainer.state.log_history if "rewards/margins" in entry]
    assert [entry["step"] for entry in logs] == list(range(1, 25))
    for key in ("loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "logps/chosen"):
        assert all(key in entry for entry in logs), key
    margins = [entry["rewards/margins"] for entry in logs]
    early, late = sum(margins[:4]) / 4, sum(margins[-4:]) / 4
    assert abs(early) < 0.1 < late, margins
    assert sum(entry["loss"] for entry in logs[-4:]) / 4 < 0.6 < logs[0]["loss"] + 0.05

    metrics = [json.loads(line) for line in (result.run_dir.path / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == list(range(1, 25)) and all("loss" in m for m in metrics)
    report = json.loads((result.run_dir.path / "data_report.json").read_text())
    assert report["format"] == "preference" and report["samples"] == 32 and 0 < report["trained_tokens"]
    # The adapter moved; the reference is the adapter switched off, not a second adapter.
    assert list(result.model.peft_config) == ["default"]
    assert all(b.abs().max() > 0 for b in lora_b(result.model).values())
    exported = result.exports["lora"][0]
    assert (exported / "adapter_model.safetensors").exists() and not (exported / "ref").exists()


def test_dpo_through_the_python_api(demo_base, tmp_path, trainers):
    model, tokenizer = ftengine.load_model(str(demo_base), max_seq_length=64, dtype="float32")
    model = ftengine.add_lora(model, r=4, lora_alpha=8, use_gradient_checkpointing=False)
    dataset = ftengine.load_dataset(str(ASSETS / "preference.jsonl"), tokenizer, trainer="dpo", max_seq_length=64,
                                    chat_template="chatml", max_rows=8)
    assert dataset.ftengine_report.samples == 8 and set(dataset.column_names) >= {"prompt", "chosen", "rejected"}
    assert dataset[1]["prompt"] == [{"role": "user", "content": "What is the capital of Germany?"}]
    before = lora_b(model)
    result = ftengine.train(model, tokenizer, dataset, trainer="dpo", beta=0.1, max_steps=2,
                            per_device_train_batch_size=4, gradient_accumulation_steps=1, learning_rate=1e-3,
                            output_dir=str(tmp_path / "run"))
    assert result.steps == 2 and result.first_loss == pytest.approx(0.6931, abs=1e-3)  # log(2): policy == reference
    assert trainers[0].args.beta == 0.1 and trainers[0].args.max_length == 64
    # trl splits each pair where the data stage (and the preview) put the trained tokens.
    for i in range(8):
        row = trainers[0].train_dataset[i]
        for side in ("chosen", "rejected"):
            enc = encode_completion(tokenizer, dataset[i]["prompt"], dataset[i][side])
            assert row[f"{side}_ids"] == [t for t, trained in zip(enc.input_ids, enc.trained, strict=True) if trained]
            assert row["prompt_ids"] == enc.input_ids[: enc.trained.index(True)]
    assert any(not torch.equal(before[k], v) for k, v in lora_b(model).items())


def test_dpo_full_fine_tuning_trains_against_a_frozen_copy(demo_base, tmp_path, trainers):
    model, tokenizer = ftengine.load_model(str(demo_base), max_seq_length=64, dtype="float32", full_finetuning=True)
    dataset = ftengine.load_dataset(str(ASSETS / "preference.jsonl"), tokenizer, trainer="dpo", max_seq_length=64,
                                    chat_template="chatml", max_rows=4)
    before = model.lm_head.weight.detach().clone()
    ftengine.train(model, tokenizer, dataset, trainer="dpo", max_steps=1, per_device_train_batch_size=4,
                   gradient_accumulation_steps=1, learning_rate=1e-3, output_dir=str(tmp_path / "run"))
    reference = trainers[0].ref_model
    assert reference is not model and not any(p.requires_grad for p in reference.parameters())
    assert torch.equal(reference.lm_head.weight, before) and not torch.equal(model.lm_head.weight, before)


def test_a_prompt_that_fills_max_seq_length_is_never_dropped_silently(demo_base):
    from transformers import AutoTokenizer

    from ftengine.core.types import Sample

    tokenizer = AutoTokenizer.from_pretrained(str(demo_base))
    long = Sample(prompt="What is the capital of France? " * 8, chosen="Paris.", rejected="Rome.")
    pairs = [("p.jsonl: row 1", Sample(prompt="Hi?", chosen="Hello.", rejected="No.")), ("p.jsonl: row 2", long)]
    with pytest.raises(DataError, match=r"p.jsonl: row 2: the prompt alone \(\d+ tokens\) fills max_seq_length=32"):
        preference_rows(pairs, tokenizer, 32, "error", DataReport())
    report = DataReport()
    rows = preference_rows(pairs, tokenizer, 32, "skip", report)
    assert len(rows) == 1 and report.skipped == 1 and report.skip_kinds == {"prompt fills max_seq_length": 1}
    assert rows[0]["prompt"] == [{"role": "user", "content": "Hi?"}]
    assert rows[0]["chosen"] == [{"role": "assistant", "content": "Hello."}]


def test_frozen_copy_leaves_the_model_alone():
    model = torch.nn.Linear(3, 2)
    copy = frozen_copy(model)
    assert model.training and model.weight.requires_grad
    assert not copy.training and not copy.weight.requires_grad and copy.weight.data_ptr() != model.weight.data_ptr()


def test_dpo_refuses_language_model_data(demo_base, tmp_path):
    model, tokenizer = ftengine.load_model(str(demo_base), max_seq_length=64, dtype="float32")
    with pytest.raises(DataError, match="gives conversation samples, which this trainer"):
        ftengine.load_dataset(str(ASSETS / "data.jsonl"), tokenizer, trainer="dpo", chat_template="chatml")


def demo_run_configs(monkeypatch, *invocations):
    """The run configs ``ftengine`` builds for each CLI invocation (stopped before training), and the last stderr."""
    from click.testing import CliRunner

    from ftengine.cli import main
    from ftengine.core.errors import FtengineError

    seen = []

    def fake_run(config, **kwargs):
        seen.append(config)
        raise FtengineError("stopped before training")

    monkeypatch.setattr(pipeline, "run", fake_run)
    stderr = ""
    for args in invocations:
        result = CliRunner().invoke(main, args)
        assert result.exit_code == 1 and "stopped before training" in result.stderr
        stderr = result.stderr
    return seen, stderr


def test_run_demo_dpo_option(monkeypatch, demo_base):
    from click.testing import CliRunner

    from ftengine.cli import main

    seen, _ = demo_run_configs(monkeypatch, ["run", "--demo", "dpo"], ["run"])
    assert seen[0].training.trainer == "dpo" and seen[0].data.path.endswith("preference.jsonl")
    assert seen[1].training.trainer == "sft"
    refused = CliRunner().invoke(main, ["run", "--demo", "dpo", "config.yaml"])
    assert refused.exit_code == 1 and "--demo runs the built-in demo" in refused.stderr
