"""``unpaired_preference``: KTO rows, ``{"prompt": ..., "completion": ..., "label": true|false}``."""

from __future__ import annotations

from typing import Any

from ftengine.core.types import RowError
from ftengine.core.types import Sample
from ftengine.plugins.datasets.formats.common import check_conversation
from ftengine.plugins.datasets.formats.common import require_dict
from ftengine.plugins.datasets.formats.common import require_field
from ftengine.plugins.datasets.formats.common import require_string


class UnpairedPreferenceFormat:
    """A prompt, one completion and whether it is desirable (trl's unpaired preference rows)."""

    name = "unpaired_preference"
    description = 'Unpaired preference (KTO): {"prompt": ..., "completion": ..., "label": true}'

    def detect(self, row: dict[str, Any]) -> bool:
        """True for rows with ``prompt``, ``completion`` and ``label``."""
        return isinstance(row, dict) and {"prompt", "completion", "label"} <= set(row)

    def convert(self, row: dict[str, Any]) -> Sample:
        """``Sample(prompt, completion, label)``: strings, or a message-list prompt and an
        assistant message-list completion; ``label`` a boolean."""
        row = require_dict(row)
        label = require_field(row, "label")
        if not isinstance(label, bool):
            raise RowError(f"label must be true or false, got {label!r}", field="label")
        prompt, completion = require_field(row, "prompt"), require_field(row, "completion")
        if isinstance(prompt, list) != isinstance(completion, list):
            raise RowError("prompt and completion must both be strings or both be message lists",
                           field="completion" if isinstance(prompt, list) else "prompt")
        if not isinstance(prompt, list):
            return Sample(prompt=require_string(row, "prompt"), completion=require_string(row, "completion"),
                          label=label)
        completion = check_conversation(completion, "completion")
        if any(m["role"] != "assistant" for m in completion):
            raise RowError("a conversational completion must hold only assistant messages", field="completion")
        return Sample(prompt=check_conversation(prompt, "prompt", require_assistant_last=False),
                      completion=completion, label=label)
