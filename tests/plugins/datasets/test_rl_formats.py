"""The KTO (unpaired preference) and GRPO (prompt-only) formats: conversion, extra columns, and
row-numbered errors through the data layer."""

from __future__ import annotations

import json

import pytest

from ftengine.core.config import DataConfig
from ftengine.core.errors import DataError
from ftengine.core.types import RowError
from ftengine.engine.data import DataReport
from ftengine.engine.data import load_samples
from ftengine.plugins.datasets.formats.prompt import PromptFormat
from ftengine.plugins.datasets.formats.unpaired import UnpairedPreferenceFormat

USER = {"role": "user", "content": "2+2?"}


def test_unpaired_rows_convert_with_their_label():
    sample = UnpairedPreferenceFormat().convert({"prompt": "2+2?", "completion": "4", "label": True})
    assert (sample.prompt, sample.completion, sample.label, sample.kind) == ("2+2?", "4", True, "unpaired_preference")
    sample = UnpairedPreferenceFormat().convert({"prompt": [USER], "completion": [{"role": "assistant",
                                                                                   "content": "5"}], "label": False})
    assert sample.label is False and sample.completion == [{"role": "assistant", "content": "5"}]


@pytest.mark.parametrize(("row", "field", "message"), [
    ({"prompt": "a", "completion": "b", "label": "yes"}, "label", "label must be true or false"),
    ({"prompt": [USER], "completion": "b", "label": True}, "completion", "both be strings or both"),
    ({"prompt": [USER], "completion": [USER, {"role": "assistant", "content": "4"}], "label": True}, "completion",
     "only assistant messages"),
])
def test_unpaired_bad_rows_name_the_field(row, field, message):
    with pytest.raises(RowError, match=message) as info:
        UnpairedPreferenceFormat().convert(row)
    assert info.value.field == field


def test_prompt_rows_keep_their_other_columns():
    sample = PromptFormat().convert({"prompt": "2+2?", "answer": "4", "difficulty": 1})
    assert sample.kind == "prompt" and sample.prompt == "2+2?" and sample.columns == {"answer": "4", "difficulty": 1}
    sample = PromptFormat().convert({"messages": [USER], "answer": "4"})
    assert sample.prompt == [USER] and sample.columns == {"answer": "4"}


def test_a_prompt_conversation_must_end_with_the_user(tmp_path):
    path = tmp_path / "prompts.jsonl"
    rows = [{"prompt": [USER], "answer": "4"},
            {"prompt": [USER, {"role": "assistant", "content": "4"}], "answer": "4"}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(DataError, match=r"prompts.jsonl: row 2: field 'prompt\[1\]': the last message of 'prompt' "
                                        r"must be the user's turn"):
        load_samples(str(path), DataConfig(path=str(path), format="prompt"), DataReport())


def test_auto_detects_kto_and_prompt_files(tmp_path):
    kto = tmp_path / "kto.jsonl"
    kto.write_text(json.dumps({"prompt": "a", "completion": "b", "label": True}) + "\n")
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"messages": [USER], "answer": "4"}) + "\n")
    for path, name in ((kto, "unpaired_preference"), (prompts, "prompt")):
        report = DataReport()
        load_samples(str(path), DataConfig(path=str(path)), report)
        assert report.format == name
