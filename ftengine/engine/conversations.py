"""Data helpers that work on a list of row dicts or on a ``datasets.Dataset``.

* :func:`standardize_sharegpt` rewrites ShareGPT rows (``conversations`` of ``from``/``value``
  turns) as OpenAI ``messages`` rows;
* :func:`conversation_extension` stitches rows into longer multi-turn conversations.

Both read rows through the registered dataset formats (``sharegpt``, ``messages``, ``alpaca``) and
their optional ``to_messages`` capability, so a plugin that overrides a format changes them too.
"""

from __future__ import annotations

import random
import re
from typing import Any
from typing import TypeVar

from ftengine.core import plugins
from ftengine.core.errors import PluginError
from ftengine.core.types import Message
from ftengine.core.types import RowError

Data = TypeVar("Data")

CONVERSATION_FORMATS = ("messages", "sharegpt", "alpaca")
"""The formats :func:`conversation_extension` reads, in the order their ``detect`` is asked."""


def _format(name: str) -> Any:
    fmt = plugins.get("formats", name)
    if not callable(getattr(fmt, "to_messages", None)):
        raise PluginError(f"the registered {name!r} format has no to_messages(row); the data helpers need it")
    return fmt


def _as_rows(data: Any) -> tuple[list[dict[str, Any]], bool]:
    """The rows of ``data`` and whether it was a ``datasets.Dataset``."""
    if isinstance(data, list):
        return data, False
    from datasets import Dataset

    if isinstance(data, Dataset):
        return data.to_list(), True
    raise TypeError(f"expected a list of row dicts or a datasets.Dataset, got {type(data).__name__}")


def _row_error(index: int, error: RowError) -> RowError:
    return RowError(f"row {index}: {error}", field=error.field)


def standardize_sharegpt(data: Data, column: str = "messages") -> Data:
    """Rewrite ShareGPT rows as ``messages`` rows (``human`` -> ``user``, ``gpt`` -> ``assistant``, ...).

    Each row's ``conversations`` (or ``from``/``value`` ``messages``) becomes a ``messages`` list of
    ``{"role", "content"}`` dicts; the row's other fields are kept. The last turn need not be the
    assistant's.

    Args:
        data: a list of row dicts or a ``datasets.Dataset``.
        column: the field the ``{"role", "content"}`` turns go to (``"conversations"`` keeps the name).

    Returns:
        The same kind of object as ``data``, with a ``column`` field and no ``conversations`` (unless
        ``column`` is ``"conversations"``).

    Raises:
        RowError: a row that is not a ShareGPT conversation; the message starts with ``row <i>:``.
        TypeError: ``data`` is neither a list nor a ``datasets.Dataset``.
    """
    rows, is_dataset = _as_rows(data)
    sharegpt = _format("sharegpt")
    out = []
    for i, row in enumerate(rows):
        try:
            messages = sharegpt.to_messages(row)
        except RowError as error:
            raise _row_error(i, error) from error
        out.append({**{k: v for k, v in row.items() if k not in ("conversations", "messages")}, column: messages})
    return _from_rows(out) if is_dataset else out


def _conversation(index: int, row: Any) -> list[Message]:
    """The row's conversation through the first format that claims it; a ``messages`` row none claims
    (one ending with a user turn) gets the ``messages`` format's own error, which says what is wrong."""
    names = [name for name in CONVERSATION_FORMATS if plugins.get("formats", name).detect(row)]
    if not names and isinstance(row, dict) and "messages" in row:
        names = ["messages"]
    if not names:
        raise RowError(f"row {index}: not a conversation (expected messages, sharegpt or alpaca fields)")
    try:
        return plugins.get("formats", names[0]).convert(row).messages
    except RowError as error:
        raise _row_error(index, error) from error


def conversation_extension(data: Data, n: int, seed: int = 3407) -> Data:
    """Stitch ``n`` rows at a time into one multi-turn conversation.

    Row ``i`` of the result is row ``i``'s conversation followed by the conversations of ``n - 1``
    other rows drawn at random (without replacement, never row ``i`` itself). Only row ``i``'s
    system message is kept. The rows may be ``messages``, ShareGPT or Alpaca rows. The same
    ``seed`` always gives the same result.

    Args:
        data: a list of row dicts or a ``datasets.Dataset``.
        n: how many rows make one conversation (1 keeps each row as it is).
        seed: seed of the random draw.

    Returns:
        The same kind of object as ``data``, one ``{"messages": [...]}`` row per input row.

    Raises:
        ValueError: ``n`` is below 1 or above the number of rows.
        RowError: a row that is not a conversation; the message starts with ``row <i>:``.
        TypeError: ``data`` is neither a list nor a ``datasets.Dataset``.
    """
    rows, is_dataset = _as_rows(data)
    if n < 1 or n > max(len(rows), 1):
        raise ValueError(f"n must be between 1 and the number of rows ({len(rows)}), got {n}")
    conversations = [_conversation(i, row) for i, row in enumerate(rows)]
    rng = random.Random(seed)
    out = []
    for i, conversation in enumerate(conversations):
        others = [j if j < i else j + 1 for j in rng.sample(range(len(rows) - 1), n - 1)]
        messages = list(conversation)
        for j in others:
            messages += [m for m in conversations[j] if m["role"] != "system"]
        out.append({"messages": messages})
    return _from_rows(out) if is_dataset else out


_extend = conversation_extension  # to_sharegpt's argument of that name hides the function

OPTIONAL_PART = re.compile(r"\[\[(.*?)\]\]", re.DOTALL)
FIELD = re.compile(r"\{(\w+)\}")


def _merge(prompt: str, row: dict[str, Any], index: int) -> str:
    """``prompt`` with each ``{column}`` filled from ``row``; a ``[[...]]`` part is dropped when a column
    it names is empty or missing."""
    def fill(part: str) -> str:
        def value(match: re.Match[str]) -> str:
            name = match.group(1)
            if name not in row:
                raise RowError(f"row {index}: merged_prompt names column {name!r}, which the row lacks "
                               f"(columns: {', '.join(map(str, row))})", field=name)
            return "" if row[name] is None else str(row[name])

        return FIELD.sub(value, part)

    def optional(match: re.Match[str]) -> str:
        part = match.group(1)
        names = FIELD.findall(part)
        return fill(part) if all(str(row.get(n) or "").strip() for n in names) else ""

    return fill(OPTIONAL_PART.sub(optional, prompt))


def to_sharegpt(data: Data, merged_prompt: str, output_column_name: str, conversation_extension: int = 1,
                seed: int = 3407) -> Data:
    """Turn single-turn rows of any columns into ShareGPT conversations.

    Each row becomes a ``human`` turn, ``merged_prompt`` with each ``{column}`` filled in (a part in
    ``[[...]]`` is left out when a column it names is empty, e.g. an Alpaca row without ``input``),
    and a ``gpt`` turn, the row's ``output_column_name``. With ``conversation_extension`` above 1,
    that many rows are stitched into each conversation (see :func:`conversation_extension`).

    Returns:
        The same kind of object as ``data``, one ``{"conversations": [...]}`` row per input row.

    Raises:
        RowError: a row lacking a column the prompt or the output names; the message starts with ``row <i>:``.
    """
    rows, is_dataset = _as_rows(data)
    out = []
    for i, row in enumerate(rows):
        if row.get(output_column_name) is None:
            raise RowError(f"row {i}: no output column {output_column_name!r} (columns: {', '.join(map(str, row))})",
                           field=output_column_name)
        out.append({"conversations": [{"from": "human", "value": _merge(merged_prompt, row, i)},
                                      {"from": "gpt", "value": str(row[output_column_name])}]})
    if conversation_extension > 1:
        out = [{"conversations": [{"from": {"user": "human", "assistant": "gpt"}.get(m["role"], m["role"]),
                                   "value": m["content"]} for m in r["messages"]]}
               for r in _extend(out, conversation_extension, seed)]
    return _from_rows(out) if is_dataset else out


def _from_rows(rows: list[dict[str, Any]]) -> Any:
    from datasets import Dataset

    return Dataset.from_list(rows)
