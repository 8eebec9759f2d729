"""``ftengine data preview``: rendered samples with the trained tokens marked, statistics over the
whole dataset, and never the model's weights."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import yaml
from click.testing import CliRunner

from ftengine.cli import main
from ftengine.core.config import validate_config
from ftengine.core.types import Sample
from ftengine.demo import ASSETS
from ftengine.engine import preview as previewing
from ftengine.engine.data import encode_sample
from ftengine.engine.data import pack_bins

ROWS = [json.loads(line) for line in (ASSETS / "data.jsonl").read_text().splitlines()[:12]]


@pytest.fixture(scope="module")
def tokenizer_only(demo_base, tmp_path_factory):
    """The demo model's directory without its weights: config and tokenizer files only."""
    target = tmp_path_factory.mktemp("no-weights")
    for path in demo_base.iterdir():
        if path.suffix != ".safetensors":
            shutil.copy(path, target / path.name)
    return target


def write(tmp_path, model, rows, lines=(), **data):
    path = tmp_path / "data.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + "".join(line + "\n" for line in lines))
    config = {"model": {"name_or_path": str(model), "max_seq_length": 40},
              "data": {"path": str(path), "chat_template": "chatml", **data}}
    config_path = tmp_path / "config.yaml"
    config_path.write_text(yaml.safe_dump(config))
    return config_path, path


def percentile(values, p):
    return sorted(values)[math.ceil(p * len(values)) - 1]


def test_preview_prints_marked_samples_and_statistics(tokenizer_only, tmp_path):
    config, data = write(tmp_path, tokenizer_only, ROWS, lines=['{"messages": []}', "{broken"], packing=True)
    result = CliRunner().invoke(main, ["data", "preview", str(config), "-n", "2"])
    assert result.exit_code == 0, result.output
    out = result.stdout
    assert out.count("--- sample ") == 2 and f"--- sample 2 ({data}: row 2)" in out
    assert ("<|im_start|>user\nWhat is the capital of Germany?<|im_end|>\n<|im_start|>assistant\n"
            "[[The capital of Germany is Berlin.<|im_end|>\n]]") in out
    assert "... truncated: 6 more tokens beyond max_seq_length=40" in out  # sample 1 has 46
    assert "\x1b[" not in out  # not a terminal: brackets, no colour codes

    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_only))
    encoded = [encode_sample(Sample(messages=r["messages"]), tokenizer, "assistant") for r in ROWS]
    lengths = [len(e.input_ids) for e in encoded]
    truncated = sum(n > 40 for n in lengths)
    cut = [min(n, 40) for n in lengths]
    trained = sum(sum(e.trained[:40]) for e in encoded)
    bins = pack_bins(cut, 40)
    assert "rows            14 read: 12 converted (messages), 12 used, 2 skipped" in out
    assert "1 x not valid JSON" in out and "1 x bad field messages" in out
    assert f"{data}: line 14: not valid JSON" in out and f"{data}: row 13: field 'messages'" in out
    assert (f"token lengths   mean {sum(lengths) / 12:.1f}, p50 {percentile(lengths, 0.5)}, "
            f"p95 {percentile(lengths, 0.95)}, max {max(lengths)} (max_seq_length 40)") in out
    assert truncated and f"truncated       {truncated / 12:.1%} of samples ({truncated})" in out
    assert f"trained tokens  {trained / sum(cut):.1%} of {sum(cut)} tokens" in out
    assert f"packing         {len(bins)} rows of 40 tokens, {sum(cut) / (len(bins) * 40):.1%}" in out


def test_preview_never_loads_weights(tokenizer_only, tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM

    def refuse(*args, **kwargs):
        raise AssertionError("preview loaded the model")

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", refuse)
    config, _ = write(tmp_path, tokenizer_only, ROWS[:3])
    result = CliRunner().invoke(main, ["data", "preview", str(config), "-n", "0"])
    assert result.exit_code == 0, result.output
    assert "--- sample" not in result.stdout
    assert "rows            3 read: 3 converted (messages), 3 used, 0 skipped" in result.stdout
    assert "off (data.packing: false)" in result.stdout


def test_colour_on_a_terminal(tokenizer_only):
    config = validate_config({"model": {"name_or_path": str(tokenizer_only)},
                              "data": {"path": str(ASSETS / "data.jsonl"), "chat_template": "chatml",
                                       "max_rows": 2, "train_on": "all"}})
    tokenizer, template = previewing.load_tokenizer(config)
    result = previewing.build_preview(config, tokenizer, n=1)
    text = previewing.format_sample(1, result.shown[0], 128, color=True)
    # train_on all: everything but the first token
    assert (f"<|im_start|>{previewing.ANSI_TRAINED}system\nYou are a helpful assistant." in text
            and text.endswith(f"Paris.<|im_end|>\n{previewing.ANSI_RESET}"))
    assert template == "chatml" and "[[" not in text


def test_preview_of_preference_pairs(tokenizer_only, tmp_path):
    rows = [json.loads(line) for line in (ASSETS / "preference.jsonl").read_text().splitlines()[1:5]]
    config, data = write(tmp_path, tokenizer_only, rows)
    raw = yaml.safe_load(config.read_text())
    raw["training"] = {"trainer": "dpo"}
    config.write_text(yaml.safe_dump(raw))
    result = CliRunner().invoke(main, ["data", "preview", str(config), "-n", "1"])
    assert result.exit_code == 0, result.output
    out = result.stdout
    assert f"--- sample 1 ({data}: row 1) chosen:" in out and f"--- sample 1 ({data}: row 1) rejected:" in out
    assert "<|im_start|>user\nWhat is the capital of Germany?<|im_end|>\n<|im_start|>assistant\n[[" in out
    assert "[[The capital of Germany is Berlin.<|im_end|>\n]]" in out
    assert "[[The capital of Germany is Canberra.<|im_end|>\n]]" in out
    assert "rows                                    4 read: 4 converted (preference), 4 used, 0 skipped" in out
    assert "packing                                 not used by the dpo trainer" in out


def test_preview_errors_are_one_line(tmp_path):
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({"model": {"name_or_path": str(tmp_path / "missing")},
                                      "data": {"path": str(tmp_path / "d.jsonl")}}))
    result = CliRunner().invoke(main, ["data", "preview", str(config)])
    assert result.exit_code == 1 and result.stderr.strip().splitlines()[-1].startswith("error: ")
    assert "model path does not exist" in result.stderr
