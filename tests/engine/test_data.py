"""The data stage: label masks with a real byte-level BPE tokenizer, every source kind, eval splits,
every bad input (error or skip, never silent), and packing (same per-token losses as unpacked)."""

from __future__ import annotations

import csv
import json
import types

import pytest
import torch
import yaml

from ftengine.core.config import DataConfig
from ftengine.core.config import validate_config
from ftengine.core.errors import DataError
from ftengine.core.types import Sample
from ftengine.demo import ASSETS
from ftengine.engine import pipeline
from ftengine.engine import run_data
from ftengine.engine.data import IGNORE
from ftengine.engine.data import DataReport
from ftengine.engine.data import encode_sample
from ftengine.engine.data import load_samples
from ftengine.engine.data import pack_rows
from ftengine.engine.data import render
from ftengine.engine.data import tokenize_sample
from ftengine.engine.data import tokenize_samples
from ftengine.engine.templates import apply_chat_template
from ftengine.plugins.trainers.collator import PadCollator

SPECIALS = [
    "<|im_start|>", "<|im_end|>", "<|endoftext|>",  # ChatML / Qwen2.5
    "<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>", "<|eom_id|>",
    "<|end_of_text|>", "<|finetune_right_pad_id|>",  # Llama 3.1
    "<s>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>",  # Phi-3
]

SINGLE = [{"role": "user", "content": "What is the capital of France?"},
          {"role": "assistant", "content": "The capital of France is Paris."}]
MULTI = [{"role": "system", "content": "Answer in one short sentence."},
         {"role": "user", "content": "What is two plus three?"},
         {"role": "assistant", "content": "Two plus three is five."},
         {"role": "user", "content": "What is the opposite of hot?"},
         {"role": "assistant", "content": "The opposite of hot is cold."}]

# What each template puts after an assistant turn's content: (an earlier turn, the last turn).
TURN_ENDS = {
    "chatml": ("<|im_end|>\n", "<|im_end|>\n"),
    "qwen2.5": ("<|im_end|>\n", "<|im_end|>\n"),
    "llama-3.1": ("<|eot_id|>", "<|eot_id|>"),
    "phi-3": ("<|end|>\n", "<|end|>\n<|endoftext|>"),  # Phi-3 closes a whole conversation with its eos
}
FIRST_TOKEN = {"chatml": "<|im_start|>", "qwen2.5": "<|im_start|>", "llama-3.1": "<|begin_of_text|>", "phi-3": None}


@pytest.fixture(scope="module")
def bpe():
    """The demo's byte-level BPE tokenizer with every special token the tested templates need."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(ASSETS / "tokenizer" / "tokenizer.json"))
    tok.add_special_tokens(SPECIALS)
    return tok


def tokenizer_with(bpe, template):
    from transformers import PreTrainedTokenizerFast

    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    return apply_chat_template(tokenizer, template)


def trained_substrings(enc) -> list[str]:
    """The text of each maximal run of trained tokens."""
    runs, start, end = [], None, None
    for (s, e), trained in zip(enc.offsets, enc.trained, strict=True):
        if trained:
            start, end = (s if start is None else start), e
        elif start is not None:
            runs.append(enc.text[start:end])
            start = None
    if start is not None:
        runs.append(enc.text[start:end])
    return runs


def expected_substrings(template, messages, train_on, text):
    middle, last = TURN_ENDS[template]
    contents = [m["content"] for m in messages if m["role"] == "assistant"]
    if train_on == "assistant":
        return [c + middle for c in contents[:-1]] + [contents[-1] + last]
    if train_on == "last":
        return [contents[-1] + last]
    first = FIRST_TOKEN[template] or ("<|system|>" if messages[0]["role"] == "system" else "<|user|>")
    assert text.startswith(first)
    return [text[len(first):]]  # everything but the first token, which nothing predicts


@pytest.mark.parametrize("train_on", ["assistant", "last", "all"])
@pytest.mark.parametrize("messages", [SINGLE, MULTI], ids=["single", "multi"])
@pytest.mark.parametrize("template", sorted(TURN_ENDS))
def test_trained_substrings(bpe, template, messages, train_on):
    tokenizer = tokenizer_with(bpe, template)
    sample = Sample(messages=messages)
    enc = encode_sample(sample, tokenizer, train_on)
    assert enc.text == render(tokenizer, messages)
    expected = expected_substrings(template, messages, train_on, enc.text)
    assert trained_substrings(enc) == expected
    # The labels say the same: decoding the trained label ids gives exactly those characters.
    row = tokenize_sample(sample, tokenizer, 512, train_on)
    assert row["input_ids"] == enc.input_ids
    trained_ids = [label for label in row["labels"] if label != IGNORE]
    assert tokenizer.decode(trained_ids) == "".join(expected)


def test_completion_and_text_samples(bpe):
    tokenizer = tokenizer_with(bpe, "chatml")
    completion = encode_sample(Sample(prompt="The capital of France is", completion=" Paris."), tokenizer, "assistant")
    assert trained_substrings(completion) == [" Paris.<|im_end|>"]
    text = encode_sample(Sample(text="The sky is blue."), tokenizer, "assistant")
    assert text.text == "The sky is blue.<|im_end|>"
    first = text.text[: text.offsets[0][1]]
    assert trained_substrings(text) == [text.text[len(first):]]


def test_raw_text_starts_with_the_bos_the_tokenizer_puts_first(bpe):
    from tokenizers.processors import TemplateProcessing
    from transformers import PreTrainedTokenizerFast

    bpe.post_processor = TemplateProcessing(single="<|begin_of_text|> $A", special_tokens=[
        ("<|begin_of_text|>", bpe.token_to_id("<|begin_of_text|>"))])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<|begin_of_text|>", eos_token="<|eot_id|>",
                                        pad_token="<|finetune_right_pad_id|>")
    # the ids the tokenizer itself gives the text (as at inference), the EOS after
    text = encode_sample(Sample(text="The sky is blue."), tokenizer, "assistant")
    assert text.input_ids == tokenizer("The sky is blue.<|eot_id|>")["input_ids"]
    assert text.input_ids[0] == tokenizer.bos_token_id
    already = encode_sample(Sample(text="<|begin_of_text|>The sky is blue."), tokenizer, "assistant")
    assert already.input_ids == text.input_ids
    completion = encode_sample(Sample(prompt="The capital of France is", completion=" Paris."), tokenizer, "assistant")
    assert completion.input_ids == tokenizer("The capital of France is Paris.<|eot_id|>")["input_ids"]
    assert trained_substrings(completion) == [" Paris.<|eot_id|>"]


def test_truncation_is_counted(bpe):
    tokenizer = tokenizer_with(bpe, "chatml")
    samples = [("a.jsonl: row 1", Sample(messages=MULTI)), ("a.jsonl: row 2", Sample(messages=SINGLE))]
    full = len(encode_sample(Sample(messages=MULTI), tokenizer, "assistant").input_ids)
    report = DataReport()
    rows = tokenize_samples(samples, tokenizer, full - 5, "assistant", "error", report)
    assert [len(r["input_ids"]) for r in rows] == [full - 5, len(encode_sample(samples[1][1], tokenizer,
                                                                               "assistant").input_ids)]
    assert report.truncated == 1 and report.samples == 2
    assert report.tokens == sum(len(r["input_ids"]) for r in rows)
    assert report.trained_tokens == sum(label != IGNORE for r in rows for label in r["labels"])


# ----------------------------------------------------------------------------- sources


ALPACA = [{"instruction": f"Name color {i}.", "input": "", "output": f"Color {i}."} for i in range(3)]
MESSAGES = [{"messages": [{"role": "user", "content": f"Question {i}?"},
                          {"role": "assistant", "content": f"Answer {i}."}]} for i in range(4)]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def user_turns(samples):
    return [s.messages[-2]["content"] for _, s in samples]


def test_sources(tmp_path):
    import datasets

    write_jsonl(tmp_path / "m.jsonl", MESSAGES)
    (tmp_path / "a.json").write_text(json.dumps(ALPACA))
    datasets.Dataset.from_list(ALPACA).to_parquet(str(tmp_path / "a.parquet"))
    with (tmp_path / "a.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["instruction", "input", "output"])
        writer.writeheader()
        writer.writerows(ALPACA)
    folder = tmp_path / "folder"
    (folder / "sub").mkdir(parents=True)
    write_jsonl(folder / "one.jsonl", MESSAGES[:2])
    write_jsonl(folder / "sub" / "two.jsonl", MESSAGES[2:])
    (folder / "README.md").write_text("not data")

    alpaca_turns = [f"Name color {i}." for i in range(3)]
    cases = [("m.jsonl", [f"Question {i}?" for i in range(4)]), ("a.json", alpaca_turns),
             ("a.parquet", alpaca_turns), ("a.csv", alpaca_turns),
             ("folder", [f"Question {i}?" for i in range(4)]), ("folder/*.jsonl", ["Question 0?", "Question 1?"])]
    for path, turns in cases:
        report = DataReport()
        samples = load_samples(str(tmp_path / path), DataConfig(), report)
        assert user_turns(samples) == turns, path
        assert report.rows == len(turns) and report.skipped == 0
        assert samples[0][0].endswith(": row 1")
    assert load_samples(str(tmp_path / "a.csv"), DataConfig(), DataReport())[0][1].messages == [
        {"role": "user", "content": "Name color 0."}, {"role": "assistant", "content": "Color 0."}]


def test_missing_sources(tmp_path):
    with pytest.raises(DataError, match="dataset file not found"):
        load_samples(str(tmp_path / "nope.jsonl"), DataConfig(), DataReport())
    with pytest.raises(DataError, match="matches no"):
        load_samples(str(tmp_path / "*.parquet"), DataConfig(), DataReport())


# ----------------------------------------------------------------------------- eval split


def data_stage(tokenizer, **data):
    config = validate_config({"model": {"name_or_path": "unused", "max_seq_length": 64},
                              "data": {"format": "messages", "chat_template": "chatml", **data}})
    loaded = pipeline.LoadedModel(types.SimpleNamespace(), tokenizer, None)
    return run_data.data(loaded, config)


def as_set(dataset):
    return {tuple(ids) for ids in dataset["input_ids"]}


def test_eval_from_a_separate_file(bpe, tmp_path):
    tokenizer = tokenizer_with(bpe, "chatml")
    train, evaluation, report = data_stage(tokenizer, path=str(write_jsonl(tmp_path / "t.jsonl", MESSAGES)),
                                           eval_path=str(write_jsonl(tmp_path / "e.jsonl", MESSAGES[:1])))
    assert len(train) == 4 and len(evaluation) == 1
    assert report.samples == 4 and report.eval["samples"] == 1 and report.eval["rows"] == 1


def test_held_out_fraction_is_seeded(bpe, tmp_path):
    tokenizer = tokenizer_with(bpe, "chatml")
    rows = [{"messages": [{"role": "user", "content": f"Question {i}?"}, {"role": "assistant", "content": "Yes."}]}
            for i in range(20)]
    path = str(write_jsonl(tmp_path / "t.jsonl", rows))
    everything = as_set(data_stage(tokenizer, path=path)[0])
    held = {}
    for seed in (1, 1, 2):
        train, evaluation, report = data_stage(tokenizer, path=path, eval_fraction=0.25, seed=seed)
        assert (len(train), len(evaluation), report.eval) == (15, 5, {"samples": 5})
        assert not as_set(train) & as_set(evaluation) and as_set(train) | as_set(evaluation) == everything
        held.setdefault(seed, []).append(as_set(evaluation))
    assert held[1][0] == held[1][1] != held[2][0]


def test_held_out_fraction_is_split_before_packing(bpe, tmp_path):
    tokenizer = tokenizer_with(bpe, "chatml")
    rows = [{"messages": [{"role": "user", "content": f"Question {i}?"}, {"role": "assistant", "content": "Yes."}]}
            for i in range(10)]
    path = str(write_jsonl(tmp_path / "t.jsonl", rows))
    train, evaluation, report = data_stage(tokenizer, path=path, eval_fraction=0.2, packing=True)

    def samples(dataset):
        out = []
        for ids, positions in zip(dataset["input_ids"], dataset["position_ids"], strict=True):
            starts = [i for i, p in enumerate(positions) if p == 0] + [len(ids)]
            out += [tuple(ids[a:b]) for a, b in zip(starts, starts[1:], strict=False)]
        return out

    train_samples, eval_samples = samples(train), samples(evaluation)
    assert len(train_samples) == 8 and len(eval_samples) == 2 and not set(train_samples) & set(eval_samples)
    assert report.packed_rows == len(train) < 8


# ----------------------------------------------------------------------------- bad input

GOOD = {"messages": SINGLE}
BAD_ROWS = [
    ("missing field", {"conversation": SINGLE}, "field 'messages'", "missing required field 'messages'"),
    ("unknown role", {"messages": [{"role": "robot", "content": "Hi"}, SINGLE[1]]}, "field 'messages[0].role'",
     "unknown role 'robot'"),
    ("empty conversation", {"messages": []}, "field 'messages'", "empty conversation"),
    ("last turn not the assistant's", {"messages": SINGLE[:1]}, "field 'messages[0].role'",
     "must be the assistant's"),
    ("non-string content", {"messages": [SINGLE[0], {"role": "assistant", "content": 5}]},
     "field 'messages[1].content'", "content must be a string or a list of content parts, got int"),
    ("not an object", [1, 2], "row 2", "expected a JSON object, got list"),
]


def bad_file(tmp_path, line):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(GOOD) + "\n" + line + "\n" + json.dumps(GOOD) + "\n")
    return path


@pytest.mark.parametrize(("what", "row", "where", "words"), BAD_ROWS, ids=[b[0] for b in BAD_ROWS])
def test_a_bad_row_is_an_error_naming_file_row_and_field(tmp_path, what, row, where, words):
    path = bad_file(tmp_path, json.dumps(row))
    with pytest.raises(DataError) as error:
        load_samples(str(path), DataConfig(format="messages"), DataReport())
    message = str(error.value)
    assert message.startswith(f"{path}: row 2") and where in message and words in message
    assert "on_bad_rows: skip" in message


def test_invalid_json_lines_name_the_line(tmp_path):
    path = bad_file(tmp_path, '{"messages": [')
    with pytest.raises(DataError, match=rf"^{path}: line 2: not valid JSON"):
        load_samples(str(path), DataConfig(format="messages"), DataReport())


def test_bad_rows_skipped_and_reported(tmp_path):
    lines = [json.dumps(GOOD)] + [json.dumps(row) for _, row, _, _ in BAD_ROWS] + ["{oops", json.dumps(GOOD)]
    path = tmp_path / "mixed.jsonl"
    path.write_text("\n".join(lines) + "\n")
    report = DataReport()
    samples = load_samples(str(path), DataConfig(format="messages", on_bad_rows="skip"), report)
    assert len(samples) == 2 and report.rows == 9 and report.skipped == 7
    assert sum(report.skip_kinds.values()) == 7
    assert report.skip_kinds["not valid JSON"] == 1 and report.skip_kinds["not an object"] == 1
    assert report.skip_kinds["bad field messages[].role"] == 2
    numbers = sorted(int(r.split(": ")[1].split()[1]) for r in report.skip_reasons)
    assert numbers == list(range(2, 9))


def test_a_template_error_names_the_row(bpe):
    tokenizer = tokenizer_with(bpe, "chatml")
    tokenizer.chat_template = ("{{ raise_exception('no system role') if messages[0].role == 'system' }}"
                               "{% for m in messages %}{{ m.content }}{% endfor %}")
    samples = [("d.jsonl: row 1", Sample(messages=SINGLE)), ("d.jsonl: row 2", Sample(messages=MULTI))]
    with pytest.raises(DataError, match=r"d.jsonl: row 2: the chat template cannot render it: no system role"):
        tokenize_samples(samples, tokenizer, 64, "all", "error", DataReport())


def test_skipped_rows_reach_the_summary_and_the_run_directory(demo_base, tmp_path):
    from click.testing import CliRunner

    from ftengine.cli import main

    lines = [json.dumps(GOOD)] * 12 + [json.dumps({"messages": []}), "not json"]
    data = tmp_path / "data.jsonl"
    data.write_text("\n".join(lines) + "\n")
    config = {"model": {"name_or_path": str(demo_base), "max_seq_length": 64, "dtype": "float32"},
              "lora": {"r": 4, "lora_alpha": 8},
              "data": {"path": str(data), "format": "messages", "chat_template": "chatml", "on_bad_rows": "skip",
                       "packing": True},
              "training": {"max_steps": 1, "per_device_train_batch_size": 2, "gradient_accumulation_steps": 1,
                           "gradient_checkpointing": False},
              "export": [], "output": {"dir": str(tmp_path / "runs"), "name": "bad"}}
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    result = CliRunner().invoke(main, ["run", str(path)])
    assert result.exit_code == 0, result.output
    assert "2 skipped" in result.stdout
    assert f"{data}: row 13: field 'messages'" in result.stdout and f"{data}: line 14: not valid JSON" in result.stdout
    (run,) = (tmp_path / "runs").iterdir()
    report = json.loads((run / "data_report.json").read_text())
    assert report["skipped"] == 2 and len(report["skip_reasons"]) == 2 and report["samples"] == 12
    assert report["packed_rows"] == 6 and 0.5 < report["packing_efficiency"] <= 1
    assert json.loads((run / "run.json").read_text())["summary"]["data"]["skipped"] == 2


# ----------------------------------------------------------------------------- packing


def test_pack_rows():
    rows = [{"input_ids": list(range(100 * i, 100 * i + n)), "labels": list(range(100 * i, 100 * i + n))}
            for i, n in enumerate([5, 9, 3, 7, 2, 10, 4])]
    packed = pack_rows(rows, 12)
    assert len(packed) == 4  # 40 tokens: 4 rows of 12 is the fewest possible
    seen = []
    for row in packed:
        assert len(row["input_ids"]) == len(row["labels"]) == len(row["position_ids"]) <= 12
        starts = [i for i, p in enumerate(row["position_ids"]) if p == 0] + [len(row["input_ids"])]
        for a, b in zip(starts, starts[1:], strict=False):
            assert row["position_ids"][a:b] == list(range(b - a))
            assert row["labels"][a] == IGNORE and row["labels"][a + 1:b] == row["input_ids"][a + 1:b]
            seen.append(row["input_ids"][a:b])
    assert sorted(seen) == sorted(r["input_ids"] for r in rows)


def per_token_ce(model, batch, **inputs):
    logits = model(input_ids=batch["input_ids"], use_cache=False, **inputs).logits  # (B, T, V)
    labels = batch["labels"][:, 1:]
    return torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), labels, reduction="none",
                                             ignore_index=IGNORE)  # (B, T-1)


@pytest.fixture(scope="module")
def packed_demo(demo_base):
    """Packed rows of real demo samples (every token trained, so the boundaries matter)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(demo_base))
    rows = [json.loads(line) for line in (ASSETS / "data.jsonl").read_text().splitlines()[:7]]
    samples = [("demo", Sample(messages=r["messages"])) for r in rows]
    tokenized = tokenize_samples(samples, tokenizer, 96, "all", "error", DataReport())
    return tokenized, pack_rows(tokenized, 96)


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_packed_rows_give_the_per_token_losses_of_their_samples(demo_base, packed_demo, attention):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(demo_base), dtype=torch.float32, attn_implementation=attention)
    model.eval()
    tokenized, packed = packed_demo
    assert len(packed) < len(tokenized) and any(0 in r["position_ids"][1:] for r in packed)
    batch = PadCollator(pad_token_id=0)(packed)
    assert "attention_mask" not in batch and batch["position_ids"].shape == batch["input_ids"].shape
    with torch.no_grad():
        packed_ce = per_token_ce(model, batch, position_ids=batch["position_ids"])
        # What a padding mask would do instead: one causal mask over the whole row.
        leaky_ce = per_token_ce(model, batch, position_ids=batch["position_ids"],
                                attention_mask=(batch["labels"] != -200).long())
        compared = 0
        for b, row in enumerate(packed):
            starts = [i for i, p in enumerate(row["position_ids"]) if p == 0] + [len(row["input_ids"])]
            for a, end in zip(starts, starts[1:], strict=False):
                single = {k: torch.tensor([row[k][a:end]]) for k in ("input_ids", "labels")}
                alone = per_token_ce(model, single)[0]  # (n-1,)
                torch.testing.assert_close(packed_ce[b, a:end - 1], alone, atol=2e-5, rtol=1e-5)
                compared += 1
                if end < len(row["input_ids"]):  # no loss for predicting the next sample's first token
                    assert packed_ce[b, end - 1] == 0
        assert compared == len(tokenized)
        assert (leaky_ce - packed_ce).abs().max() > 1e-2


def test_the_patched_model_trains_packed_rows_like_single_samples(demo_base, packed_demo, monkeypatch):
    from transformers import AutoModelForCausalLM

    monkeypatch.setenv("FTENGINE_KERNELS", "reference")
    tokenized, packed = packed_demo
    config = validate_config({"model": {"name_or_path": str(demo_base), "dtype": "float32"}, "lora": {"r": 4}})
    loaded = pipeline.adapt(pipeline.patch(pipeline.load(config)), config.lora, gradient_checkpointing=False)
    patched = loaded.model  # a fresh adapter (B = 0): the base model's function through the fused LoRA ops
    reference = AutoModelForCausalLM.from_pretrained(str(demo_base), dtype=torch.float32)
    batch = PadCollator(pad_token_id=0)(packed)
    with torch.no_grad():
        loss = patched(**batch, use_cache=False).loss
        singles = [per_token_ce(reference, {k: torch.tensor([r[k]]) for k in ("input_ids", "labels")})[0]
                   for r in tokenized]
    n_trained = sum(sum(label != IGNORE for label in r["labels"][1:]) for r in tokenized)
    assert n_trained == int((batch["labels"][:, 1:] != IGNORE).sum())
    torch.testing.assert_close(loss, torch.cat(singles).sum() / n_trained, atol=1e-5, rtol=1e-5)


def test_packed_and_unpacked_runs_train_alike(tiny_config, tmp_path):
    """Through the real pipeline and trainer: one batch holding every sample, packed or not, gives
    the same losses step after step (same trained tokens, same per-token losses, same update)."""
    rows = [json.loads(line) for line in (ASSETS / "data.jsonl").read_text().splitlines()[:12]]
    data = write_jsonl(tmp_path / "twelve.jsonl", rows)
    losses = {}
    for packing in (False, True):
        config = tiny_config(max_steps=3, per_device_train_batch_size=12)
        config.data.path, config.data.packing = str(data), packing
        config.output.name = f"packing-{packing}"
        result = pipeline.run(config)
        losses[packing] = [loss for _, loss in result.train.losses]
        if packing:
            assert result.data.packed_rows < 12 and "packing: " in " ".join(result.notes)
    assert len(losses[True]) == 3
    assert losses[True] == pytest.approx(losses[False], rel=1e-4)
