"""Reward functions for ``grpo``: the built-ins, the lookup of a configured name, and the wrapper
that turns one into what trl calls.

A reward function takes ``completions`` (the generated texts), ``prompts`` and, as keyword lists
aligned with the completions, every other column of the dataset rows (``answer=[...]``), and
returns one float (or ``None``: does not apply) per completion.
"""

from __future__ import annotations

import importlib
import importlib.util
import math
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ftengine.core.errors import ConfigError
from ftengine.core.errors import DataError
from ftengine.core.types import Reward

ROW_COLUMN = "ftengine_row"
"""The column the data stage adds to prompt rows: where each row came from (``file: row N``)."""

ANSWER_TAG = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
BOXED = re.compile(r"\\boxed\{([^{}]*)\}")
NUMBER = re.compile(r"-?\d+(?:[.,]\d+)*")


def final_answer(text: str) -> str | None:
    """The final answer of a completion: the last ``<answer>...</answer>``, else the last
    ``\\boxed{...}``, else the text after the last ``####``, else the last number, else the whole
    stripped text; ``None`` for an empty completion."""
    for pattern in (ANSWER_TAG, BOXED):
        found = pattern.findall(text)
        if found:
            return found[-1].strip()
    if "####" in text:
        return text.rsplit("####", 1)[1].strip() or None
    numbers = NUMBER.findall(text)
    return numbers[-1] if numbers else (text.strip() or None)


def _normalize(answer: Any) -> str:
    text = str(answer).strip().rstrip(".").replace(",", "")
    try:
        value = float(text)
    except ValueError:
        return " ".join(text.lower().split())
    return str(int(value)) if value.is_integer() else str(value)


def exact_match(completions: list[str], answer: list[Any] | None = None, **_: Any) -> list[float]:
    """1.0 when the completion's final answer (:func:`final_answer`) equals the row's ``answer``
    column (numbers compared as numbers, text case- and space-insensitively), else 0.0."""
    if answer is None:
        raise DataError("the exact_match reward needs an 'answer' column in the dataset")
    out = []
    for text, expected in zip(completions, answer, strict=True):
        got = final_answer(text)
        out.append(float(got is not None and _normalize(got) == _normalize(expected)))
    return out


FORMAT_PATTERN = r"^\s*<think>.*?</think>\s*<answer>.*?</answer>\s*$"


def format_reward(completions: list[str], format_pattern: list[str] | None = None, **_: Any) -> list[float]:
    """1.0 when the whole completion matches the regex (a ``format_pattern`` column of the row, else
    ``<think>...</think><answer>...</answer>``), else 0.0."""
    patterns = format_pattern or [FORMAT_PATTERN] * len(completions)
    return [float(re.fullmatch(p, text, re.DOTALL) is not None) for text, p in zip(completions, patterns, strict=True)]


LENGTH_TARGET = 64


def length_penalty(completions: list[str], **_: Any) -> list[float]:
    """``-max(0, words - 64) / 64``: nothing up to 64 words, then a penalty growing with the excess."""
    return [-max(0, len(text.split()) - LENGTH_TARGET) / LENGTH_TARGET for text in completions]


BUILTIN_REWARDS = (
    Reward("exact_match", exact_match, "1 when the final answer equals the row's 'answer' column"),
    Reward("format", format_reward, "1 when the completion matches <think>...</think><answer>...</answer> "
                                    "(or the row's 'format_pattern' regex)"),
    Reward("length_penalty", length_penalty, "0 up to 64 words, then -(words - 64) / 64"),
)


def _from_file(path: Path, attr: str, spec: str) -> Callable[..., Any]:
    if not path.is_file():
        raise ConfigError(f"reward_funcs: {spec!r}: file {path} not found")
    name = f"ftengine_reward_{abs(hash(str(path.resolve())))}"
    module_spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[name] = module
    try:
        module_spec.loader.exec_module(module)
    except Exception as exc:
        raise ConfigError(f"reward_funcs: {spec!r}: importing {path} failed: {type(exc).__name__}: {exc}") from None
    return getattr(module, attr, None)


def resolve_reward(spec: Any, registered: dict[str, Reward]) -> tuple[str, Callable[..., Any]]:
    """A reward function and its display name from a registered name, ``module:function``,
    ``path/to/file.py:function`` or a callable.

    Raises:
        ConfigError: a name nothing registered, a module or file that cannot be imported, a
            missing or non-callable function.
    """
    if callable(spec):
        return getattr(spec, "__name__", type(spec).__name__), spec
    if spec in registered:
        return spec, registered[spec].function
    if ":" not in spec:
        raise ConfigError(f"reward_funcs: {spec!r} is not a registered reward ({', '.join(sorted(registered))}) nor "
                          f"'module:function' / 'file.py:function'")
    target, attr = spec.rsplit(":", 1)
    if target.endswith(".py"):
        function = _from_file(Path(target).expanduser(), attr, spec)
    else:
        try:
            function = getattr(importlib.import_module(target), attr, None)
        except ImportError as exc:
            raise ConfigError(f"reward_funcs: {spec!r}: cannot import {target}: {exc}") from None
    if not callable(function):
        raise ConfigError(f"reward_funcs: {spec!r}: {attr} is not a function of {target}")
    return spec, function


def _text(completion: Any) -> str:
    """trl hands conversational completions as message lists; rewards see the assistant's text."""
    if isinstance(completion, list):
        return "".join(m.get("content", "") for m in completion if isinstance(m, dict))
    return completion


def checked_reward(name: str, function: Callable[..., Any]) -> Callable[..., list[float | None]]:
    """``function`` as trl calls reward functions, with the completions as texts; an exception is
    re-raised naming the function and the first dataset row of the batch, and a wrong count of
    scores or a NaN is refused naming the row."""

    def reward(prompts: list[Any], completions: list[Any], **columns: Any) -> list[float | None]:
        rows = columns.pop(ROW_COLUMN, None) or ["?"] * len(completions)
        columns = {k: v for k, v in columns.items() if k not in ("completion_ids", "trainer_state", "log_extra",
                                                                   "log_metric")}
        texts = [_text(c) for c in completions]
        try:
            scores = list(function(completions=texts, prompts=prompts, **columns))
        except DataError:
            raise
        except Exception as exc:
            raise DataError(f"reward function {name!r} failed on {rows[0]} (batch of {len(texts)}): "
                            f"{type(exc).__name__}: {exc}") from exc
        if len(scores) != len(texts):
            raise DataError(f"reward function {name!r} returned {len(scores)} scores for {len(texts)} completions "
                            f"(rows {rows[0]} ...)")
        for i, score in enumerate(scores):
            if score is not None and (not isinstance(score, (int, float)) or math.isnan(score)):
                raise DataError(f"reward function {name!r} returned {score!r} for {rows[i]}: expected a number "
                                f"(None: does not apply), never NaN")
        return [None if s is None else float(s) for s in scores]

    reward.__name__ = name.replace(":", "_").replace("/", "_").replace(".", "_")
    return reward
