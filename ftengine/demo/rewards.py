"""The GRPO demo's own reward function, given in its config as ``ftengine.demo.rewards:digits``
(the ``module:function`` form any user reward takes)."""

from __future__ import annotations

from typing import Any


def digits(completions: list[str], **columns: Any) -> list[float]:
    """The share of a completion's non-space characters that are digits: a dense signal that
    leads a model that starts from random text toward the bare number the task asks for."""
    out = []
    for text in completions:
        chars = [c for c in text if not c.isspace()]
        out.append(sum(c.isdigit() for c in chars) / len(chars) if chars else 0.0)
    return out
