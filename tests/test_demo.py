"""The built-in demo end to end, through the real CLI command: the loss falls to at most half, the
adapter and merged exports reload in peft and transformers with the in-memory model's logits, and the
merged model answers a training prompt."""

import pytest
import torch
from click.testing import CliRunner

from ftengine.cli import main
from ftengine.engine import pipeline


@pytest.fixture(scope="module")
def demo_run(demo_base, tmp_path_factory):
    runs = []
    real_run = pipeline.run

    def spy(*args, **kwargs):
        runs.append(real_run(*args, **kwargs))
        return runs[-1]

    out = tmp_path_factory.mktemp("demo-runs")
    mp = pytest.MonkeyPatch()
    mp.setattr(pipeline, "run", spy)
    try:
        cli = CliRunner().invoke(main, ["run", "--output-dir", str(out)], catch_exceptions=False)
    finally:
        mp.undo()
    assert cli.exit_code == 0, cli.output
    return cli, runs[0]


def test_loss_falls_to_half(demo_run):
    _, result = demo_run
    assert result.train.last_loss <= 0.5 * result.train.first_loss, result.train.losses
    assert result.run_dir.status()["status"] == "completed"


def test_merged_model_answers_a_training_prompt(demo_run):
    from ftengine.demo import EXPECTED_ANSWER
    from ftengine.demo import PROMPT

    cli, _ = demo_run
    assert f"Q: {PROMPT}" in cli.output
    assert f"A: {EXPECTED_ANSWER}" in cli.output


def test_summary(demo_run):
    cli, result = demo_run
    for key in ("steps", "loss", "wall time", "peak memory", "CPU RSS", "export lora", "export merged"):
        assert key in cli.output
    assert str(result.run_dir.path) in cli.output


def test_exports_reload_with_the_trained_logits(demo_run, demo_base):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    _, result = demo_run
    trained = result.model.eval()
    ids = result.tokenizer.apply_chat_template([{"role": "user", "content": "What is the plural of mouse?"}],
                                               add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        expected = trained(**ids).logits
        base = AutoModelForCausalLM.from_pretrained(str(demo_base), dtype=torch.float32)
        adapter = PeftModel.from_pretrained(base, str(result.exports["lora"][0])).eval()
        torch.testing.assert_close(adapter(**ids).logits, expected, atol=1e-4, rtol=1e-4)
        merged = AutoModelForCausalLM.from_pretrained(str(result.exports["merged"][0])).float().eval()
        torch.testing.assert_close(merged(**ids).logits, expected, atol=5e-2, rtol=0)
