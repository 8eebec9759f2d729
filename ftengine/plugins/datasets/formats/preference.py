"""``preference``: ``{"prompt": ..., "chosen": ..., "rejected": ...}`` rows for DPO."""

from __future__ import annotations

from typing import Any

from ftengine.core.types import Message
from ftengine.core.types import RowError
from ftengine.core.types import Sample
from ftengine.plugins.datasets.formats.common import check_conversation
from ftengine.plugins.datasets.formats.common import require_dict
from ftengine.plugins.datasets.formats.common import require_field
from ftengine.plugins.datasets.formats.common import require_string


def _common_prefix(a: list[Message], b: list[Message]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


class PreferenceFormat:
    """A prompt with a chosen and a rejected answer, all strings or all message lists.

    Without ``prompt``, message-list ``chosen``/``rejected`` carry the prompt themselves (trl's
    implicit prompt): their longest common prefix becomes the prompt.
    """

    name = "preference"
    description = 'Preference (DPO): {"prompt": ..., "chosen": ..., "rejected": ...}'

    def detect(self, row: dict[str, Any]) -> bool:
        """True for rows with both ``chosen`` and ``rejected``."""
        return isinstance(row, dict) and "chosen" in row and "rejected" in row

    def convert(self, row: dict[str, Any]) -> Sample:
        """``Sample(prompt, chosen, rejected)``, each a non-empty string or a validated message list."""
        row = require_dict(row)
        chosen = require_field(row, "chosen")
        rejected = require_field(row, "rejected")
        conversational = isinstance(chosen, list)
        if isinstance(rejected, list) != conversational:
            raise RowError("chosen and rejected must both be strings or both be message lists", field="rejected")
        if not conversational:
            return Sample(prompt=require_string(row, "prompt"), chosen=require_string(row, "chosen"),
                          rejected=require_string(row, "rejected"))
        chosen = check_conversation(chosen, "chosen")
        rejected = check_conversation(rejected, "rejected")
        if row.get("prompt") is None:
            n = _common_prefix(chosen, rejected)
            if n == 0:
                raise RowError("missing required field 'prompt' (and chosen and rejected share no leading messages)",
                               field="prompt")
            if n == len(chosen) or n == len(rejected):
                raise RowError("chosen and rejected do not differ after their shared prompt", field="rejected")
            return Sample(prompt=chosen[:n], chosen=chosen[n:], rejected=rejected[n:])
        prompt = row["prompt"]
        if not isinstance(prompt, list):
            raise RowError("with message-list chosen/rejected the prompt must be a message list too", field="prompt")
        return Sample(prompt=check_conversation(prompt, "prompt", require_assistant_last=False),
                      chosen=chosen, rejected=rejected)
