"""Fuzzing config dicts and dataset rows: a clean error or a success, never a traceback, never a
silent wrong result (bounded examples so it stays fast)."""

import json
import math

import pytest
from hypothesis import HealthCheck
from hypothesis import given
from hypothesis import settings
from hypothesis import strategies as st

from ftengine.core.config import RunConfig
from ftengine.core.config import validate_config
from ftengine.core.errors import ConfigError
from ftengine.core.errors import DataError

SECTIONS = {name: list(field.annotation.model_fields) for name, field in RunConfig.model_fields.items()
            if hasattr(field.annotation, "model_fields")}
SCALARS = st.one_of(st.none(), st.booleans(), st.integers(-10**6, 10**6), st.floats(allow_nan=True),
                    st.text(max_size=12), st.sampled_from(["auto", "sft", "dpo", "lora", "cosine", "messages", "../x",
                                                           "all-linear", "skip_step", "float32", "-1", "1e-3"]))
VALUES = st.recursive(SCALARS, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                       st.dictionaries(st.text(max_size=8), inner, max_size=3)),
                      max_leaves=6)


@st.composite
def config_dicts(draw):
    """Mostly-real keys with any values, plus some misspelt keys and sections."""
    raw = {"model": {"name_or_path": draw(st.one_of(st.text(min_size=1, max_size=10), VALUES))}}
    for section in draw(st.lists(st.sampled_from([*SECTIONS, "trainng"]), max_size=4, unique=True)):
        keys = SECTIONS.get(section, ["x"]) + ["lerning_rate"]
        raw.setdefault(section, {}).update(draw(st.dictionaries(st.sampled_from(keys), VALUES, max_size=4)))
    if draw(st.booleans()):
        raw["export"] = draw(st.lists(st.fixed_dictionaries({"format": st.sampled_from(["lora", "merged", "gguf",
                                                                                          "nope"])},
                                                             optional={"quantization": VALUES, "system": VALUES,
                                                                       "parameters": VALUES}), max_size=3))
    return raw


def _numbers(value):
    if isinstance(value, float):
        yield value
    elif isinstance(value, dict):
        for item in value.values():
            yield from _numbers(item)
    elif isinstance(value, list):
        for item in value:
            yield from _numbers(item)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(config_dicts())
def test_any_config_validates_or_fails_cleanly(raw):
    try:
        config = validate_config(raw)
    except ConfigError as exc:
        lines = str(exc).splitlines()
        assert lines[0].startswith("config: ") and len(lines) >= 2 and all(line.strip() for line in lines)
        return
    dumped = config.model_dump(mode="json")
    assert all(math.isfinite(x) for x in _numbers(dumped))  # no inf/nan slips through
    assert validate_config(dumped).model_dump(mode="json") == dumped  # what the run directory stores reloads
    name = config.output.name
    assert name is None or ("/" not in name and name not in (".", ".."))
    for section, values in raw.items():
        if section in SECTIONS and isinstance(values, dict):  # no value was replaced by another silently
            for key, value in values.items():
                if isinstance(value, float | int) and not isinstance(value, bool):
                    assert getattr(getattr(config, section), key) == value


ROLES = st.sampled_from(["user", "assistant", "system", "tool", "", "USER", None])
MESSAGE = st.fixed_dictionaries({"role": ROLES, "content": st.one_of(st.text(max_size=20), st.none(),
                                                                     st.integers(), VALUES)})
ROWS = st.one_of(
    st.fixed_dictionaries({"messages": st.lists(MESSAGE, max_size=4)}),
    st.fixed_dictionaries({"messages": VALUES}),
    st.dictionaries(st.sampled_from(["messages", "text", "prompt", "completion", "conversations"]), VALUES,
                    max_size=2),
    VALUES,
)


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    from ftengine.demo import ASSETS
    from ftengine.engine.templates import apply_chat_template

    tok = AutoTokenizer.from_pretrained(str(ASSETS / "tokenizer"))
    apply_chat_template(tok, "chatml")
    return tok


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                 HealthCheck.function_scoped_fixture])
@given(rows=st.lists(ROWS, min_size=1, max_size=4), skip=st.booleans())
def test_any_rows_load_or_fail_cleanly(rows, skip, tokenizer, tmp_path_factory):
    from ftengine.core.config import DataConfig
    from ftengine.engine.data import DataReport
    from ftengine.engine.data import load_samples
    from ftengine.engine.data import tokenize_samples

    path = tmp_path_factory.mktemp("rows") / "data.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    on_bad_rows = "skip" if skip else "error"
    data = DataConfig(path=str(path), format="messages", on_bad_rows=on_bad_rows)
    report = DataReport()
    try:
        samples = load_samples(str(path), data, report)
        tokenized = tokenize_samples(samples, tokenizer, 64, "assistant", on_bad_rows, report)
    except DataError as exc:
        assert not skip and str(exc).startswith(str(path)) and "\n" not in str(exc)
        return
    assert len(samples) + report.skipped >= len(rows) if skip else len(samples) == len(rows)
    for row in tokenized:
        ids, labels = row["input_ids"], row["labels"]
        assert len(ids) == len(labels) <= 64
        assert all(label in (-100, token) for label, token in zip(labels, ids, strict=True))
