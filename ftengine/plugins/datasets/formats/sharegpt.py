"""``sharegpt``: ``{"conversations": [{"from": "human", "value": ...}, ...]}`` rows."""

from __future__ import annotations

from typing import Any

from ftengine.core.types import Message
from ftengine.core.types import RowError
from ftengine.core.types import Sample
from ftengine.plugins.datasets.formats.common import check_conversation
from ftengine.plugins.datasets.formats.common import require_dict

ROLE_ALIASES: dict[str, str] = {
    "system": "system",
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "model": "assistant",
    "bot": "assistant",
    "tool": "tool",
}


def _is_sharegpt_turns(turns: Any) -> bool:
    return isinstance(turns, list) and bool(turns) and isinstance(turns[0], dict) and "from" in turns[0]


def sharegpt_messages(row: dict[str, Any], require_assistant_last: bool = True) -> list[Message]:
    """The row's turns as OpenAI messages (``from``/``value`` or ``role``/``content`` turns).

    The turns are read from ``conversations``, or from ``messages`` when the row has no
    ``conversations``; roles are mapped through :data:`ROLE_ALIASES`.

    Args:
        row: one dataset row.
        require_assistant_last: whether the last turn must be the assistant's.

    Returns:
        New ``{"role", "content"}`` dicts.

    Raises:
        RowError: no turns, a turn that is not an object, an unknown role, non-string text, or
            (with ``require_assistant_last``) a last turn that is not the assistant's.
    """
    row = require_dict(row)
    key = "messages" if "conversations" not in row and "messages" in row else "conversations"
    turns = row.get(key)
    if turns is None:
        raise RowError(f"missing required field 'conversations' (fields present: {', '.join(map(str, row)) or 'none'})",
                       field="conversations")
    if not isinstance(turns, list):
        raise RowError(f"field {key!r} must be a list of turns, got {type(turns).__name__}", field=key)
    messages: list[Message] = []
    for i, turn in enumerate(turns):
        where = f"{key}[{i}]"
        if not isinstance(turn, dict):
            raise RowError(f"{where} must be an object with from and value, got {type(turn).__name__}", field=where)
        role_key, text_key = ("from", "value") if "from" in turn else ("role", "content")
        role = turn.get(role_key)
        mapped = ROLE_ALIASES.get(role.lower()) if isinstance(role, str) else None
        if mapped is None:
            raise RowError(f"{where} has unknown role {role!r}; expected one of {', '.join(ROLE_ALIASES)}",
                           field=f"{where}.{role_key}")
        text = turn.get(text_key)
        if not isinstance(text, str):
            raise RowError(f"{where} {text_key} must be a string, got {type(text).__name__}",
                           field=f"{where}.{text_key}")
        messages.append({"role": mapped, "content": text})
    return check_conversation(messages, key, require_assistant_last=require_assistant_last)


class ShareGPTFormat:
    """ShareGPT conversations: ``from`` in human/gpt/system (aliases user, assistant, model, bot, tool)."""

    name = "sharegpt"
    description = 'ShareGPT: {"conversations": [{"from": "human", "value": ...}, {"from": "gpt", "value": ...}]}'

    def detect(self, row: dict[str, Any]) -> bool:
        """True for a ``conversations`` list, or a ``messages`` list of ``from``/``value`` turns."""
        if not isinstance(row, dict) or "chosen" in row or "rejected" in row:
            return False
        if isinstance(row.get("conversations"), list):
            return "messages" not in row or _is_sharegpt_turns(row["messages"])
        return _is_sharegpt_turns(row.get("messages"))

    def convert(self, row: dict[str, Any]) -> Sample:
        """The conversation as OpenAI messages; the last turn must be the assistant's."""
        return Sample(messages=sharegpt_messages(row))

    def to_messages(self, row: dict[str, Any]) -> list[Message]:
        """The turns as OpenAI messages, whoever speaks last (``standardize_sharegpt``)."""
        return sharegpt_messages(row, require_assistant_last=False)
