"""``prompt``: prompt-only rows to generate from (GRPO): ``{"prompt": ..., "answer": ...}`` or
``{"messages": [..., {"role": "user", ...}], ...}``; the other fields go to the reward functions."""

from __future__ import annotations

from typing import Any

from ftengine.core.types import RowError
from ftengine.core.types import Sample
from ftengine.plugins.datasets.formats.common import check_conversation
from ftengine.plugins.datasets.formats.common import require_dict
from ftengine.plugins.datasets.formats.common import require_string

ANSWER_FIELDS = ("completion", "chosen", "rejected", "label", "response", "output")


def ends_with_user_turn(messages: Any) -> bool:
    """Whether ``messages`` is a role/content list whose last turn is the user's (a prompt to answer)."""
    return (isinstance(messages, list) and bool(messages) and isinstance(messages[-1], dict)
            and messages[-1].get("role") == "user")


class PromptFormat:
    """A prompt string, or a conversation ending with a user turn, plus any extra columns."""

    name = "prompt"
    description = 'Prompt-only (GRPO): {"prompt": ...} or {"messages": [..., user turn]}, extra columns kept'

    def detect(self, row: dict[str, Any]) -> bool:
        """True for a ``prompt`` without any answer field, or ``messages`` ending with a user turn."""
        if not isinstance(row, dict) or any(f in row for f in ANSWER_FIELDS):
            return False
        if "prompt" in row:
            return "messages" not in row
        return ends_with_user_turn(row.get("messages"))

    def convert(self, row: dict[str, Any]) -> Sample:
        """``Sample(prompt, columns)``: the prompt (a string or a message list ending with a user
        turn) and the row's other fields."""
        row = require_dict(row)
        key = "prompt" if "prompt" in row else "messages"
        if key not in row:
            raise RowError("missing required field 'prompt' (or 'messages' ending with a user turn)", field="prompt")
        value = row[key]
        if isinstance(value, list):
            prompt = check_conversation(value, key, require_assistant_last=False)
            if prompt[-1]["role"] != "user":
                raise RowError(f"the last message of {key!r} must be the user's turn to answer, got "
                               f"{prompt[-1]['role']!r}", field=f"{key}[{len(prompt) - 1}]")
        else:
            prompt = require_string(row, key)
        return Sample(prompt=prompt, columns={k: v for k, v in row.items() if k != key})
