"""``messages``: OpenAI chat rows, ``{"messages": [{"role": ..., "content": ...}, ...]}``."""

from __future__ import annotations

from typing import Any

from ftengine.core.types import Sample
from ftengine.plugins.datasets.formats.common import check_conversation
from ftengine.plugins.datasets.formats.common import require_dict
from ftengine.plugins.datasets.formats.common import require_field
from ftengine.plugins.datasets.formats.prompt import ends_with_user_turn


class MessagesFormat:
    """OpenAI role/content conversations under ``messages`` (system, user, assistant, tool)."""

    name = "messages"
    description = 'OpenAI chat: {"messages": [{"role": "user", "content": ...}, ...]}'

    def detect(self, row: dict[str, Any]) -> bool:
        """True for a ``messages`` list whose turns are role/content (not ShareGPT's from/value) and
        whose last turn is not the user's (that is a ``prompt`` row to generate from)."""
        if not isinstance(row, dict) or "chosen" in row or "rejected" in row:
            return False
        messages = row.get("messages")
        if not isinstance(messages, list):
            return False
        if messages and isinstance(messages[0], dict) and "from" in messages[0]:
            return False
        return not ends_with_user_turn(messages)

    def convert(self, row: dict[str, Any]) -> Sample:
        """The conversation, validated; the last turn must be the assistant's."""
        row = require_dict(row)
        return Sample(messages=check_conversation(require_field(row, "messages"), "messages"))
