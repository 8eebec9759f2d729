"""``completion``: ``{"prompt": ..., "completion": ...}`` rows (only the completion is trained)."""

from __future__ import annotations

from typing import Any

from ftengine.core.types import RowError
from ftengine.core.types import Sample
from ftengine.plugins.datasets.formats.common import check_conversation
from ftengine.plugins.datasets.formats.common import require_dict
from ftengine.plugins.datasets.formats.common import require_field
from ftengine.plugins.datasets.formats.common import require_string


class CompletionFormat:
    """Prompt and completion strings; or, conversationally, two message lists (trl's prompt-completion)."""

    name = "completion"
    description = 'Prompt-completion: {"prompt": ..., "completion": ...}'

    def detect(self, row: dict[str, Any]) -> bool:
        """True for rows with ``prompt`` and ``completion`` and no preference fields (nor KTO's ``label``)."""
        if not isinstance(row, dict) or "prompt" not in row or "completion" not in row:
            return False
        return "chosen" not in row and "rejected" not in row and "label" not in row

    def convert(self, row: dict[str, Any]) -> Sample:
        """``Sample(prompt, completion)`` for strings; ``Sample(messages=prompt + completion)`` for message lists."""
        row = require_dict(row)
        prompt = require_field(row, "prompt")
        completion = require_field(row, "completion")
        if isinstance(prompt, list) and isinstance(completion, list):
            head = check_conversation(prompt, "prompt", require_assistant_last=False)
            tail = check_conversation(completion, "completion")
            if any(m["role"] != "assistant" for m in tail):
                raise RowError("a conversational completion must hold only assistant messages", field="completion")
            return Sample(messages=head + tail)
        if isinstance(prompt, list) or isinstance(completion, list):
            raise RowError("prompt and completion must both be strings or both be message lists",
                           field="completion" if isinstance(prompt, list) else "prompt")
        return Sample(prompt=require_string(row, "prompt"), completion=require_string(row, "completion"))
