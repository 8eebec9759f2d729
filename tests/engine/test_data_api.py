"""The data API on what a notebook holds: in-memory rows, the segments format, raw text without a
chat template, load_model's max_seq_length as the default, untokenized rows passed to train."""

import json
from types import SimpleNamespace

import pytest
from transformers import AutoTokenizer

import ftengine
from ftengine.core.config import validate_config
from ftengine.core.errors import ConfigError
from ftengine.core.errors import DataError
from ftengine.demo import ASSETS
from ftengine.engine import pipeline
from ftengine.engine import run_data

ROWS = [{"messages": [{"role": "user", "content": "Capital of Chile?"},
                      {"role": "assistant", "content": "Santiago."}]},
        {"messages": [{"role": "user", "content": "Capital of Peru?"}, {"role": "assistant", "content": "Lima."}]}]


@pytest.fixture
def tokenizer():
    return AutoTokenizer.from_pretrained(str(ASSETS / "tokenizer"))


def trained(tokenizer, row):
    return tokenizer.decode([t for t, label in zip(row["input_ids"], row["labels"], strict=True) if label != -100])


@pytest.mark.parametrize("kind", ["list", "dataset", "dataframe"])
def test_in_memory_rows_equal_a_file(tokenizer, tmp_path, kind):
    import datasets
    import pandas

    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    data = {"list": ROWS, "dataset": datasets.Dataset.from_list(ROWS), "dataframe": pandas.DataFrame(ROWS)}[kind]
    assert ftengine.load_dataset(data, tokenizer).to_list() == ftengine.load_dataset(str(path), tokenizer).to_list()


def test_in_memory_errors_name_the_row(tokenizer):
    with pytest.raises(DataError, match="data: row 2: field 'messages'"):
        ftengine.load_dataset([ROWS[0], {"messages": "not a list"}], tokenizer, format="messages")
    with pytest.raises(DataError, match="a pandas DataFrame or a list of dicts, got int"):
        ftengine.load_dataset(3, tokenizer)


def test_segments_train_only_labelled_spans(tokenizer):
    rows = [{"segments": [{"text": "Q: capital of Chile?\n", "label": False}, {"text": "A: Santiago.", "label": True},
                          {"text": "\nQ: and Peru?\n", "label": False}, {"text": "A: Lima.", "label": True}]}]
    row = ftengine.load_dataset(rows, tokenizer)[0]
    assert tokenizer.decode(row["input_ids"]) == "Q: capital of Chile?\nA: Santiago.\nQ: and Peru?\nA: Lima."
    assert trained(tokenizer, row) == "A: Santiago.A: Lima."
    with pytest.raises(DataError, match="no segment has label: true"):
        ftengine.load_dataset([{"segments": [{"text": "x", "label": False}]}], tokenizer, format="segments")


def test_max_seq_length_of_load_model_is_the_default(demo_base):
    model, tokenizer = ftengine.load_model(str(demo_base), max_seq_length=12, dtype="float32")
    row = ftengine.load_dataset([{"text": "one two three four five six seven eight nine ten " * 3}], tokenizer)[0]
    assert len(row["input_ids"]) == 12


def test_raw_text_needs_no_chat_template(tmp_path):
    """A tokenizer without a template, and an architecture whose default template needs tokens it lacks."""
    tokenizer = AutoTokenizer.from_pretrained(str(ASSETS / "tokenizer"))
    tokenizer.chat_template = None
    data = tmp_path / "text.jsonl"
    data.write_text(json.dumps({"text": "Santiago is the capital of Chile."}) + "\n")
    loaded = pipeline.LoadedModel(SimpleNamespace(), tokenizer, SimpleNamespace(default_chat_template="llama-3.1"))
    config = validate_config({"model": {"name_or_path": "-"}, "data": {"path": str(data)}, "export": []})
    train, _, report = run_data.data(loaded, config)
    assert report.format == "text" and "chat template: none (the format is template-free)" in loaded.notes
    assert tokenizer.decode(train[0]["input_ids"]) == "Santiago is the capital of Chile." + tokenizer.eos_token
    conversations = tmp_path / "messages.jsonl"
    conversations.write_text(json.dumps(ROWS[0]) + "\n")
    config = validate_config({"model": {"name_or_path": "-"}, "data": {"path": str(conversations)}, "export": []})
    with pytest.raises(DataError, match="needs the token '<\\|begin_of_text\\|>'"):
        run_data.data(loaded, config)


def test_train_tokenizes_untokenized_rows(demo_base, tmp_path):
    model, tokenizer = ftengine.load_model(str(demo_base), max_seq_length=32, dtype="float32")
    model = ftengine.add_lora(model, r=4, use_gradient_checkpointing=False)
    result = ftengine.train(model, tokenizer, ROWS * 2, output_dir=str(tmp_path / "run"), max_steps=2,
                            per_device_train_batch_size=2, gradient_accumulation_steps=1, save_steps=100)
    assert result.steps == 2 and result.last_loss is not None
    import datasets

    tokenized = datasets.Dataset.from_list([{"input_ids": [1, 2, 3, 4]}] * 2)  # no labels: every token trained
    assert ftengine._prepared(tokenized, tokenizer, "sft")["labels"] == [[1, 2, 3, 4]] * 2
    result = ftengine.train(model, tokenizer, tokenized, output_dir=str(tmp_path / "run2"), max_steps=1,
                            per_device_train_batch_size=2, gradient_accumulation_steps=1, save_steps=100)
    assert result.steps == 1 and result.last_loss is not None


def test_an_option_less_exporter_lists_the_keys_it_takes():
    with pytest.raises(ConfigError, match=r"export\[0\]\.quantization: unknown key; expected one of: "
                                          r"export\[0\]\.push_to_hub, export\[0\]\.private$"):
        validate_config({"model": {"name_or_path": "-"}, "export": [{"format": "lora", "quantization": "q8_0"}]})
