"""Dataset formats: detection (exactly one format claims each shape), conversion, and every bad-row error."""

import pytest

from ftengine.core.types import DatasetFormat
from ftengine.core.types import RowError
from ftengine.core.types import Sample
from ftengine.core.types import check_protocol
from ftengine.plugins.datasets.formats import FORMATS

BY_NAME = {fmt.name: fmt for fmt in FORMATS}

CONV = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]

# (expected format, row): every shape each format must claim, alone.
SHAPES = [
    ("alpaca", {"instruction": "Add 2 and 2.", "input": "", "output": "4"}),
    ("alpaca", {"instruction": "Translate.", "input": "chat", "output": "cat", "system": "Be terse."}),
    ("alpaca", {"instruction": "Name a color.", "output": "Blue", "text": "rendered copy"}),
    ("sharegpt", {"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello!"}]}),
    ("sharegpt", {"conversations": CONV}),
    ("sharegpt", {"messages": [{"from": "user", "value": "Hi"}, {"from": "assistant", "value": "Hello!"}]}),
    ("messages", {"messages": CONV}),
    ("messages", {"messages": CONV, "text": "rendered copy", "id": 7}),
    ("messages", {"messages": CONV, "conversations": CONV}),
    ("segments", {"segments": [{"text": "Q: hi\n", "label": False}, {"text": "A: hello", "label": True}]}),
    ("segments", {"segments": [{"text": "A: hello", "label": True}], "text": "A: hello"}),
    ("text", {"text": "Once upon a time."}),
    ("text", {"text": "Once upon a time.", "meta": {"source": "web"}, "id": 3}),
    ("completion", {"prompt": "The capital of France is", "completion": " Paris."}),
    ("completion", {"prompt": [CONV[0]], "completion": [CONV[1]]}),
    ("preference", {"prompt": "2+2?", "chosen": "4", "rejected": "5"}),
    ("preference", {"prompt": [CONV[0]], "chosen": [CONV[1]], "rejected": [{"role": "assistant", "content": "No."}]}),
    ("preference", {"chosen": CONV, "rejected": [CONV[0], {"role": "assistant", "content": "No."}]}),
    ("unpaired_preference", {"prompt": "2+2?", "completion": "4", "label": True}),
    ("unpaired_preference", {"prompt": [CONV[0]], "completion": [CONV[1]], "label": False}),
    ("prompt", {"prompt": "2+2?", "answer": "4"}),
    ("prompt", {"prompt": [CONV[0]]}),
    ("prompt", {"messages": [{"role": "system", "content": "Be terse."}, CONV[0]], "answer": "4"}),
    ("vision", {"image": "formula.png", "text": "x^2"}),
    ("vision", {"image": {"bytes": b"\x89PNG", "path": None}, "text": "x^2", "instruction": "Read it."}),
    ("messages", {"messages": [{"role": "user", "content": [{"type": "image", "image": "a.png"},
                                                            {"type": "text", "text": "What is it?"}]},
                               {"role": "assistant", "content": [{"type": "text", "text": "A cat."}]}]}),
]


def test_every_format_is_a_dataset_format():
    assert sorted(BY_NAME) == ["alpaca", "completion", "messages", "preference", "prompt", "segments", "sharegpt",
                               "text", "unpaired_preference", "vision"]
    for fmt in FORMATS:
        assert check_protocol(fmt, DatasetFormat) == []
        assert fmt.description


@pytest.mark.parametrize(("expected", "row"), SHAPES)
def test_exactly_one_format_detects_each_shape(expected, row):
    assert [fmt.name for fmt in FORMATS if fmt.detect(row)] == [expected]


@pytest.mark.parametrize("row", [None, "text", ["a"], 3, {}, {"id": 1}, {"text": 5}, {"messages": "hi"}])
def test_no_format_detects_foreign_rows(row):
    assert [fmt.name for fmt in FORMATS if fmt.detect(row)] == []


@pytest.mark.parametrize(("expected", "row"), SHAPES)
def test_every_detected_shape_converts(expected, row):
    sample = BY_NAME[expected].convert(row)
    assert isinstance(sample, Sample)


def test_alpaca_convert():
    fmt = BY_NAME["alpaca"]
    assert fmt.convert({"instruction": "Add.", "input": "2 and 2", "output": "4", "system": "Be terse."}) == Sample(
        messages=[
            {"role": "system", "content": "Be terse."},
            {"role": "user", "content": "Add.\n\n2 and 2"},
            {"role": "assistant", "content": "4"},
        ]
    )
    assert fmt.convert({"instruction": "Name a color.", "input": None, "output": "Blue"}).messages == [
        {"role": "user", "content": "Name a color."},
        {"role": "assistant", "content": "Blue"},
    ]


def test_sharegpt_convert_maps_every_alias():
    fmt = BY_NAME["sharegpt"]
    row = {
        "conversations": [
            {"from": "system", "value": "S"},
            {"from": "human", "value": "a"},
            {"from": "gpt", "value": "b"},
            {"from": "user", "value": "c"},
            {"from": "model", "value": "d"},
            {"from": "Human", "value": "e"},
            {"from": "bot", "value": "f"},
            {"from": "user", "value": "g"},
            {"from": "assistant", "value": "h"},
        ]
    }
    roles = [m["role"] for m in fmt.convert(row).messages]
    assert roles == ["system", "user", "assistant", "user", "assistant", "user", "assistant", "user", "assistant"]
    assert [m["content"] for m in fmt.convert(row).messages] == list("Sabcdefgh")
    assert fmt.convert({"conversations": CONV}).messages == CONV


def test_messages_convert_passes_tool_messages_through():
    call = {"id": "c1", "type": "function", "function": {"name": "add", "arguments": {"a": 2, "b": 2}}}
    messages = [
        {"role": "system", "content": "You can add."},
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "content": "4", "tool_call_id": "c1"},
        {"role": "assistant", "content": "It is 4."},
    ]
    out = BY_NAME["messages"].convert({"messages": messages}).messages
    assert out[2] == {"role": "assistant", "content": "", "tool_calls": [call]}
    assert out[3] == {"role": "tool", "content": "4", "tool_call_id": "c1"}
    assert out[4] == messages[4]
    assert messages[2]["content"] is None  # the row itself is left alone


def test_messages_convert_drops_null_fields():
    row = {"messages": [{"role": "user", "content": "Hi", "tool_calls": None, "name": None},
                        {"role": "assistant", "content": "Hello!", "tool_calls": None, "name": "bot"}]}
    assert BY_NAME["messages"].convert(row).messages == [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!", "name": "bot"},
    ]


def test_text_and_completion_convert():
    assert BY_NAME["text"].convert({"text": "Once."}) == Sample(text="Once.")
    assert BY_NAME["completion"].convert({"prompt": "P", "completion": "C"}) == Sample(prompt="P", completion="C")
    assert BY_NAME["completion"].convert({"prompt": [CONV[0]], "completion": [CONV[1]]}) == Sample(messages=CONV)


def test_preference_convert():
    fmt = BY_NAME["preference"]
    assert fmt.convert({"prompt": "2+2?", "chosen": "4", "rejected": "5"}) == Sample(
        prompt="2+2?", chosen="4", rejected="5"
    )
    no = {"role": "assistant", "content": "No."}
    explicit = fmt.convert({"prompt": [CONV[0]], "chosen": [CONV[1]], "rejected": [no]})
    assert explicit == Sample(prompt=[CONV[0]], chosen=[CONV[1]], rejected=[no])
    assert explicit.kind == "preference"
    implicit = fmt.convert({"chosen": CONV, "rejected": [CONV[0], no]})
    assert implicit == Sample(prompt=[CONV[0]], chosen=[CONV[1]], rejected=[no])


# (format, row, field the error must name, words the message must hold)
BAD_ROWS = [
    ("alpaca", "not a row", None, "object"),
    ("alpaca", {"input": "x", "output": "y"}, "instruction", "missing required field 'instruction'"),
    ("alpaca", {"instruction": "x"}, "output", "missing required field 'output'"),
    ("alpaca", {"instruction": "  ", "output": "y"}, "instruction", "empty"),
    ("alpaca", {"instruction": 3, "output": "y"}, "instruction", "must be a string"),
    ("alpaca", {"instruction": "x", "input": ["a"], "output": "y"}, "input", "must be a string"),
    ("alpaca", {"instruction": "x", "output": "y", "system": 1}, "system", "must be a string"),
    ("sharegpt", ["turns"], None, "object"),
    ("sharegpt", {"id": 1}, "conversations", "missing required field 'conversations'"),
    ("sharegpt", {"conversations": "hi"}, "conversations", "must be a list"),
    ("sharegpt", {"conversations": []}, "conversations", "empty conversation"),
    ("sharegpt", {"conversations": ["hi"]}, "conversations[0]", "must be an object"),
    ("sharegpt", {"conversations": [{"from": "narrator", "value": "x"}]}, "conversations[0].from", "unknown role"),
    ("sharegpt", {"conversations": [{"from": "human", "value": 5}]}, "conversations[0].value", "must be a string"),
    ("sharegpt", {"conversations": [{"from": "human", "value": "x"}]}, "conversations[0].role",
     "must be the assistant"),
    ("messages", 42, None, "object"),
    ("messages", {"text": "x"}, "messages", "missing required field 'messages'"),
    ("messages", {"messages": {"role": "user"}}, "messages", "must be a list"),
    ("messages", {"messages": []}, "messages", "empty conversation"),
    ("messages", {"messages": ["hi"]}, "messages[0]", "must be an object"),
    ("messages", {"messages": [{"role": "human", "content": "x"}]}, "messages[0].role", "unknown role 'human'"),
    ("messages", {"messages": [{"content": "x"}]}, "messages[0].role", "unknown role None"),
    ("messages", {"messages": [CONV[0], {"role": "assistant", "content": ["x"]}]}, "messages[1].content[0]",
     "must be a content part object"),
    ("messages", {"messages": [CONV[0], {"role": "assistant", "content": 3}]}, "messages[1].content",
     "must be a string or a list of content parts"),
    ("messages", {"messages": [CONV[0], {"role": "assistant"}]}, "messages[1].content", "must be a string"),
    ("messages", {"messages": [CONV[1], CONV[0]]}, "messages[1].role", "must be the assistant's, got 'user'"),
    ("text", None, None, "object"),
    ("text", {"content": "x"}, "text", "missing required field 'text'"),
    ("text", {"text": ""}, "text", "empty"),
    ("text", {"text": ["x"]}, "text", "must be a string"),
    ("completion", (), None, "object"),
    ("completion", {"prompt": "p"}, "completion", "missing required field 'completion'"),
    ("completion", {"completion": "c"}, "prompt", "missing required field 'prompt'"),
    ("completion", {"prompt": 1, "completion": "c"}, "prompt", "must be a string"),
    ("completion", {"prompt": "p", "completion": [CONV[1]]}, "prompt", "both be strings or both be message lists"),
    ("completion", {"prompt": [CONV[0]], "completion": [CONV[0]]}, "completion[0].role", "must be the assistant"),
    ("completion", {"prompt": [CONV[0]], "completion": CONV}, "completion", "only assistant messages"),
    ("preference", "x", None, "object"),
    ("preference", {"prompt": "p", "rejected": "r"}, "chosen", "missing required field 'chosen'"),
    ("preference", {"prompt": "p", "chosen": "c"}, "rejected", "missing required field 'rejected'"),
    ("preference", {"chosen": "c", "rejected": "r"}, "prompt", "missing required field 'prompt'"),
    ("preference", {"prompt": "p", "chosen": "", "rejected": "r"}, "chosen", "empty"),
    ("preference", {"prompt": "p", "chosen": "c", "rejected": [CONV[1]]}, "rejected", "both be strings"),
    ("preference", {"prompt": "p", "chosen": [CONV[1]], "rejected": [CONV[1]]}, "prompt", "must be a message list"),
    ("preference", {"prompt": [CONV[0]], "chosen": [], "rejected": [CONV[1]]}, "chosen", "empty conversation"),
    ("preference", {"prompt": [CONV[0]], "chosen": [CONV[0]], "rejected": [CONV[1]]}, "chosen[0].role",
     "must be the assistant"),
    ("preference", {"prompt": [{"role": "critic", "content": "x"}], "chosen": [CONV[1]], "rejected": [CONV[1]]},
     "prompt[0].role", "unknown role"),
    ("preference", {"chosen": [CONV[1]], "rejected": [{"role": "assistant", "content": "No."}]}, "prompt",
     "share no leading messages"),
    ("preference", {"chosen": CONV, "rejected": CONV}, "rejected", "do not differ"),
]


@pytest.mark.parametrize(("name", "row", "field", "words"), BAD_ROWS)
def test_bad_rows_raise_row_error_naming_the_field(name, row, field, words):
    with pytest.raises(RowError) as info:
        BY_NAME[name].convert(row)
    assert info.value.field == field
    assert words in str(info.value)


def test_content_parts():
    messages = BY_NAME["messages"]
    sample = messages.convert({"messages": [
        {"role": "user", "content": [{"type": "text", "text": "What "}, {"type": "text", "text": "is it?"},
                                     {"type": "image", "image": "a.png"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "A "}, {"type": "text", "text": "cat."}]}]})
    assert sample.messages[0]["content"][2] == {"type": "image", "image": "a.png"}
    assert sample.messages[1]["content"] == "A cat."  # text parts alone join into one string
    bad = [({"type": "audio"}, r"content\[0\] has unknown type 'audio'"),
           ({"type": "text", "text": 3}, "is a text part without a string 'text'"),
           ("hi", "must be a content part object, got str")]
    for part, message in bad:
        with pytest.raises(RowError, match=message):
            messages.convert({"messages": [{"role": "user", "content": [part]}, CONV[1]]})


def test_vision_convert():
    fmt = BY_NAME["vision"]
    assert fmt.convert({"image": "f.png", "text": "x^2", "instruction": "Read."}) == Sample(messages=[
        {"role": "user", "content": [{"type": "text", "text": "Read."}, {"type": "image", "image": "f.png"}]},
        {"role": "assistant", "content": "x^2"}])
    assert fmt.convert({"image": "f.png", "text": "x^2"}).messages[0]["content"] == [{"type": "image",
                                                                                       "image": "f.png"}]
    with pytest.raises(RowError, match="field 'image' must hold one image"):
        fmt.convert({"image": ["a.png", "b.png"], "text": "x"})
    with pytest.raises(RowError, match="field 'text' is empty"):
        fmt.convert({"image": "a.png", "text": " "})
