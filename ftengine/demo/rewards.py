"""The GRPO demo's own reward function, given in its config as ``ftengine.demo.rewards:closeness``
(the ``module:function`` form any user reward takes)."""

from __future__ import annotations

from typing import Any

from ftengine.plugins.trainers.rewards import final_answer

TOLERANCE = 10


def closeness(completions: list[str], answer: list[str], **columns: Any) -> list[float]:
    """Partial credit for a number near the right one: ``1 - |got - answer| / 10`` (0 from ten away,
    and for a completion without a number). Denser than exact match, so that within a group of
    samples a nearer wrong answer still beats a farther one."""
    out = []
    for text, expected in zip(completions, answer, strict=True):
        got = final_answer(text)
        try:
            distance = abs(float(got) - float(expected))
        except (TypeError, ValueError):
            out.append(0.0)
            continue
        out.append(max(0.0, 1.0 - distance / TOLERANCE))
    return out
