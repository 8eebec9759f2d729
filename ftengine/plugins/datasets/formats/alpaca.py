"""``alpaca``: ``{"instruction": ..., "input": ..., "output": ...}`` rows (optional ``system``)."""

from __future__ import annotations

from typing import Any

from ftengine.core.types import Message
from ftengine.core.types import Sample
from ftengine.plugins.datasets.formats.common import optional_string
from ftengine.plugins.datasets.formats.common import require_dict
from ftengine.plugins.datasets.formats.common import require_string


class AlpacaFormat:
    """Stanford Alpaca rows: the user turn is the instruction, then a blank line and the input if any."""

    name = "alpaca"
    description = 'Alpaca: {"instruction": ..., "input": ... (optional), "output": ..., "system": ... (optional)}'

    def detect(self, row: dict[str, Any]) -> bool:
        """True for rows with ``instruction`` and ``output`` and no conversation or preference fields."""
        if not isinstance(row, dict) or "instruction" not in row or "output" not in row:
            return False
        return not any(key in row for key in ("messages", "conversations", "chosen", "rejected"))

    def convert(self, row: dict[str, Any]) -> Sample:
        """``[system?, user(instruction [+ "\\n\\n" + input]), assistant(output)]``."""
        row = require_dict(row)
        instruction = require_string(row, "instruction")
        extra = optional_string(row, "input")
        output = require_string(row, "output")
        system = optional_string(row, "system")
        user = f"{instruction}\n\n{extra}" if extra.strip() else instruction
        messages: list[Message] = []
        if system.strip():
            messages.append({"role": "system", "content": system})
        messages += [{"role": "user", "content": user}, {"role": "assistant", "content": output}]
        return Sample(messages=messages)
