"""Row checks shared by the formats: each failure is a :class:`RowError` naming the field."""

from __future__ import annotations

from typing import Any

from ftengine.core.types import Message
from ftengine.core.types import RowError

MESSAGE_ROLES = ("system", "user", "assistant", "tool")

# Keys that mark a row as one of the structured formats; ``text`` rows must have none of them.
STRUCTURED_KEYS = frozenset(
    {"messages", "conversations", "instruction", "output", "prompt", "completion", "chosen", "rejected", "segments",
     "image"}
)


def require_dict(row: Any) -> dict[str, Any]:
    """Return ``row`` if it is a dict.

    Raises:
        RowError: the row is not a JSON object.
    """
    if not isinstance(row, dict):
        raise RowError(f"a row must be an object with named fields, got {type(row).__name__}")
    return row


def require_field(row: dict[str, Any], key: str) -> Any:
    """Return ``row[key]``.

    Raises:
        RowError: the field is missing or null.
    """
    if row.get(key) is None:
        present = ", ".join(map(str, row)) or "none"
        raise RowError(f"missing required field {key!r} (fields present: {present})", field=key)
    return row[key]


def require_string(row: dict[str, Any], key: str, allow_empty: bool = False) -> str:
    """Return ``row[key]``, which must be a string (non-empty unless ``allow_empty``).

    Raises:
        RowError: the field is missing, not a string, or empty.
    """
    value = require_field(row, key)
    if not isinstance(value, str):
        raise RowError(f"field {key!r} must be a string, got {type(value).__name__}", field=key)
    if not allow_empty and not value.strip():
        raise RowError(f"field {key!r} is empty", field=key)
    return value


def optional_string(row: dict[str, Any], key: str) -> str:
    """Return ``row[key]`` if present and not null, else ``""``.

    Raises:
        RowError: the field is present but not a string.
    """
    value = row.get(key)
    if value is None:
        return ""
    if not isinstance(value, str):
        raise RowError(f"field {key!r} must be a string, got {type(value).__name__}", field=key)
    return value


def check_conversation(messages: Any, field: str, require_assistant_last: bool = True) -> list[Message]:
    """Validate an OpenAI-style message list and return a copy of it.

    Each message is a dict with a known ``role`` and a ``content``: a string or a list of
    content parts (:func:`check_content_parts`; a list of text parts alone becomes one string).
    An assistant message that carries ``tool_calls`` may have null content (kept as ``""``).
    Keys other than ``role`` and ``content`` (``tool_calls``, ``name``, ``tool_call_id``, ...)
    are passed through, except null
    ones (the ``None`` fields Arrow adds when rows of one column have different keys), which
    templates that test ``'tool_calls' in message`` would misread.

    Args:
        messages: the value to check.
        field: the row field it came from, for error messages (``messages``, ``chosen``, ...).
        require_assistant_last: whether the last message must be the assistant's.

    Returns:
        A new list of new dicts.

    Raises:
        RowError: not a list, empty, a message not a dict, unknown role, non-string content, or
            (with ``require_assistant_last``) a last message not from the assistant.
    """
    if not isinstance(messages, list):
        raise RowError(f"field {field!r} must be a list of messages, got {type(messages).__name__}", field=field)
    if not messages:
        raise RowError(f"field {field!r} is an empty conversation", field=field)
    out: list[Message] = []
    for i, message in enumerate(messages):
        where = f"{field}[{i}]"
        if not isinstance(message, dict):
            raise RowError(f"{where} must be an object with role and content, got {type(message).__name__}",
                           field=where)
        role = message.get("role")
        if role not in MESSAGE_ROLES:
            raise RowError(f"{where} has unknown role {role!r}; expected one of {', '.join(MESSAGE_ROLES)}",
                           field=f"{where}.role")
        content = message.get("content")
        if content is None and role == "assistant" and message.get("tool_calls"):
            content = ""
        if isinstance(content, list):
            content = check_content_parts(content, f"{where}.content")
        elif not isinstance(content, str):
            raise RowError(f"{where} content must be a string or a list of content parts, got "
                           f"{type(content).__name__}", field=f"{where}.content")
        extra = {k: v for k, v in message.items() if v is not None and k not in ("role", "content")}
        out.append({"role": role, "content": content, **extra})
    if require_assistant_last and out[-1]["role"] != "assistant":
        raise RowError(f"the last message of {field!r} must be the assistant's, got {out[-1]['role']!r}",
                       field=f"{field}[{len(out) - 1}].role")
    return out


def check_content_parts(parts: list[Any], field: str) -> str | list[dict[str, Any]]:
    """Validate a message's content parts: ``{"type": "text", "text": str}`` and ``{"type": "image",
    "image": ...}`` (a path, a ``{"bytes", "path"}`` dict as a datasets Image column holds, or a PIL
    image; the engine opens it). Parts with text only are joined into one string, which every chat
    template renders.

    Raises:
        RowError: a part that is not an object, of an unknown type, or missing its value.
    """
    out: list[dict[str, Any]] = []
    for i, part in enumerate(parts):
        where = f"{field}[{i}]"
        if not isinstance(part, dict):
            raise RowError(f"{where} must be a content part object, got {type(part).__name__}", field=where)
        kind = part.get("type")
        if kind == "text":
            if not isinstance(part.get("text"), str):
                raise RowError(f"{where} is a text part without a string 'text'", field=f"{where}.text")
            out.append({"type": "text", "text": part["text"]})
        elif kind == "image":
            if part.get("image") is None:
                raise RowError(f"{where} is an image part without an 'image' (a path, bytes or an image)",
                               field=f"{where}.image")
            out.append({"type": "image", "image": part["image"]})
        else:
            raise RowError(f"{where} has unknown type {kind!r}; expected 'text' or 'image'", field=f"{where}.type")
    if all(p["type"] == "text" for p in out):
        return "".join(p["text"] for p in out)
    return out
