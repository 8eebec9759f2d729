"""standardize_sharegpt and conversation_extension, on lists of rows and on datasets.Dataset."""

import copy

import pytest
from datasets import Dataset

from ftengine.core.types import RowError
from ftengine.engine.conversations import conversation_extension
from ftengine.engine.conversations import standardize_sharegpt

SHAREGPT = [
    {"id": 0, "conversations": [{"from": "system", "value": "S"}, {"from": "human", "value": "a"},
                                {"from": "gpt", "value": "b"}]},
    {"id": 1, "conversations": [{"from": "user", "value": "c"}, {"from": "bot", "value": "d"},
                                {"from": "human", "value": "e"}]},
]


def test_standardize_sharegpt_rows():
    before = copy.deepcopy(SHAREGPT)
    out = standardize_sharegpt(SHAREGPT)
    assert out == [
        {"id": 0, "messages": [{"role": "system", "content": "S"}, {"role": "user", "content": "a"},
                               {"role": "assistant", "content": "b"}]},
        {"id": 1, "messages": [{"role": "user", "content": "c"}, {"role": "assistant", "content": "d"},
                               {"role": "user", "content": "e"}]},
    ]
    assert SHAREGPT == before


def test_standardize_sharegpt_dataset():
    out = standardize_sharegpt(Dataset.from_list(SHAREGPT))
    assert isinstance(out, Dataset)
    assert sorted(out.column_names) == ["id", "messages"]
    assert out.to_list() == standardize_sharegpt(SHAREGPT)


def test_standardize_sharegpt_reads_from_value_messages():
    rows = [{"messages": [{"from": "human", "value": "x"}, {"from": "gpt", "value": "y"}]}]
    assert standardize_sharegpt(rows) == [
        {"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]}
    ]


def test_standardize_sharegpt_names_the_bad_row():
    rows = [SHAREGPT[0], {"conversations": [{"from": "narrator", "value": "x"}]}]
    with pytest.raises(RowError, match=r"^row 1: conversations\[0\] has unknown role 'narrator'") as info:
        standardize_sharegpt(rows)
    assert info.value.field == "conversations[0].from"


@pytest.mark.parametrize("helper", [standardize_sharegpt, lambda data: conversation_extension(data, 1)])
def test_helpers_reject_other_containers(helper):
    with pytest.raises(TypeError, match="list of row dicts or a datasets.Dataset"):
        helper({"conversations": []})


def single_turn_rows(count: int) -> list[dict]:
    return [
        {"messages": [{"role": "system", "content": f"system {i}"}, {"role": "user", "content": f"q{i}"},
                      {"role": "assistant", "content": f"a{i}"}]}
        for i in range(count)
    ]


def test_conversation_extension_stitches_n_rows():
    rows = single_turn_rows(10)
    out = conversation_extension(rows, 3, seed=1)
    assert len(out) == 10
    for i, row in enumerate(out):
        messages = row["messages"]
        assert messages[:3] == rows[i]["messages"]  # the row's own turns, system included, come first
        assert [m["role"] for m in messages] == ["system"] + ["user", "assistant"] * 3
        others = {m["content"] for m in messages[3:]}
        assert f"q{i}" not in others
        assert len({m["content"] for m in messages[3:] if m["role"] == "user"}) == 2  # two distinct other rows


def test_conversation_extension_is_deterministic_for_a_seed():
    rows = single_turn_rows(20)
    assert conversation_extension(rows, 4, seed=7) == conversation_extension(rows, 4, seed=7)
    assert conversation_extension(rows, 4, seed=7) != conversation_extension(rows, 4, seed=8)


def test_conversation_extension_dataset_and_other_formats():
    rows = [{"instruction": f"i{k}", "output": f"o{k}"} for k in range(5)]
    rows.append({"conversations": [{"from": "human", "value": "h"}, {"from": "gpt", "value": "g"}]})
    out = conversation_extension(Dataset.from_list([{"messages": r["messages"]} for r in single_turn_rows(6)]), 2)
    assert isinstance(out, Dataset)
    assert out.to_list() == conversation_extension(single_turn_rows(6), 2)
    mixed = conversation_extension(rows, 2, seed=0)
    assert mixed[5]["messages"][:2] == [{"role": "user", "content": "h"}, {"role": "assistant", "content": "g"}]
    assert all(len(row["messages"]) == 4 for row in mixed)


def test_conversation_extension_n_1_keeps_rows():
    rows = single_turn_rows(3)
    assert conversation_extension(rows, 1) == rows


@pytest.mark.parametrize("n", [0, 4])
def test_conversation_extension_rejects_n_out_of_range(n):
    with pytest.raises(ValueError, match=r"n must be between 1 and the number of rows \(3\)"):
        conversation_extension(single_turn_rows(3), n)


def test_conversation_extension_names_the_bad_row():
    rows = single_turn_rows(2) + [{"text": "not a conversation"}]
    with pytest.raises(RowError, match="^row 2: not a conversation"):
        conversation_extension(rows, 2)
    rows[2] = {"messages": [{"role": "user", "content": "unanswered"}]}
    with pytest.raises(RowError, match="^row 2: the last message of 'messages' must be the assistant's"):
        conversation_extension(rows, 2)
