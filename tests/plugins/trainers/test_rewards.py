"""Reward functions: the built-ins against hand-computed scores, the lookup of names,
``module:function`` and ``file.py:function``, and the errors naming the function and the row."""

from __future__ import annotations

import math

import pytest

from ftengine.core import plugins
from ftengine.core.errors import ConfigError
from ftengine.core.errors import DataError
from ftengine.plugins.trainers.rewards import checked_reward
from ftengine.plugins.trainers.rewards import exact_match
from ftengine.plugins.trainers.rewards import final_answer
from ftengine.plugins.trainers.rewards import format_reward
from ftengine.plugins.trainers.rewards import length_penalty
from ftengine.plugins.trainers.rewards import resolve_reward


@pytest.mark.parametrize(("text", "answer"), [
    ("<think>2 and 2</think><answer> 4 </answer>", "4"), ("so \\boxed{12} it is", "12"),
    ("work...\n#### 1,250", "1,250"), ("3 then 5, finally 7.", "7"), (" Paris ", "Paris"), ("  ", None),
])
def test_final_answer(text, answer):
    assert final_answer(text) == answer


def test_exact_match_compares_numbers_as_numbers():
    scores = exact_match(["<answer>4.0</answer>", "#### 1,250", "It is 5", "Paris."],
                         answer=["4", "1250", "6", "paris"])
    assert scores == [1.0, 1.0, 0.0, 1.0]
    with pytest.raises(DataError, match="needs an 'answer' column"):
        exact_match(["4"])


def test_format_and_length_penalty():
    assert format_reward(["<think>x</think> <answer>1</answer>", "<answer>1</answer>"]) == [1.0, 0.0]
    assert format_reward(["12", "12 apples"], format_pattern=[r"\d+", r"\d+"]) == [1.0, 0.0]
    assert length_penalty(["word " * 10, "word " * 96]) == [0.0, -0.5]


def test_builtins_are_registered():
    assert {"exact_match", "format", "length_penalty"} <= set(plugins.get_registry("rewards"))


def test_names_modules_files_and_callables_resolve(tmp_path):
    registered = plugins.get_registry("rewards")
    assert resolve_reward("format", registered) == ("format", format_reward)
    name, function = resolve_reward("ftengine.demo.rewards:closeness", registered)
    assert function(completions=["7", "x", "then 12", "-9"], answer=["7", "7", "7", "7"]) == [1.0, 0.0, 0.5, 0.0]
    source = tmp_path / "my_rewards.py"
    source.write_text("def shout(completions, **columns):\n    return [float(c.isupper()) for c in completions]\n")
    assert resolve_reward(f"{source}:shout", registered)[1](completions=["HI", "hi"]) == [1.0, 0.0]

    def mine(completions, **columns):
        return [0.0] * len(completions)

    assert resolve_reward(mine, registered) == ("mine", mine)
    for spec, message in (("nope", "is not a registered reward"), ("json:nope", "nope is not a function of json"),
                          (f"{tmp_path}/missing.py:f", "not found"), ("no_such_module_x:f", "cannot import")):
        with pytest.raises(ConfigError, match=message):
            resolve_reward(spec, registered)


def call(reward, completions, **columns):
    return reward(prompts=["p"] * len(completions), completions=completions, ftengine_row=[f"d.jsonl: row {i + 1}"
                  for i in range(len(completions))], trainer_state=None, log_extra=None, log_metric=None, **columns)


def test_the_wrapper_names_the_function_and_the_row():
    def broken(completions, answer, **_):
        return [1 / int(a) for a in answer]

    with pytest.raises(DataError, match=r"reward function 'broken' failed on d.jsonl: row 1 \(batch of 2\): "
                                        r"ZeroDivisionError"):
        call(checked_reward("broken", broken), ["a", "b"], answer=["0", "1"])
    nan = checked_reward("nan", lambda completions, **_: [0.0, math.nan])
    with pytest.raises(DataError, match=r"'nan' returned nan for d.jsonl: row 2: expected a number"):
        call(nan, ["a", "b"])
    short = checked_reward("short", lambda completions, **_: [1.0])
    with pytest.raises(DataError, match="returned 1 scores for 2 completions"):
        call(short, ["a", "b"])


def test_the_wrapper_gives_texts_and_columns():
    seen = {}

    def spy(completions, prompts, answer):
        seen.update(completions=completions, answer=answer)
        return [None, 2]

    scores = call(checked_reward("spy", spy), [[{"role": "assistant", "content": "4"}], "5"], answer=["4", "5"])
    assert scores == [None, 2.0] and seen == {"completions": ["4", "5"], "answer": ["4", "5"]}
