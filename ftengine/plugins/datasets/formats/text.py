"""``text``: ``{"text": ...}`` rows for continued pretraining (every token trained)."""

from __future__ import annotations

from typing import Any

from ftengine.core.types import Sample
from ftengine.plugins.datasets.formats.common import STRUCTURED_KEYS
from ftengine.plugins.datasets.formats.common import require_dict
from ftengine.plugins.datasets.formats.common import require_string


class TextFormat:
    """Raw text under ``text``."""

    name = "text"
    description = 'Raw text: {"text": ...} (continued pretraining)'
    needs_chat_template = False

    def detect(self, row: dict[str, Any]) -> bool:
        """True for a string ``text`` in a row with no conversation, instruction or preference fields."""
        return isinstance(row, dict) and isinstance(row.get("text"), str) and not STRUCTURED_KEYS & row.keys()

    def convert(self, row: dict[str, Any]) -> Sample:
        """``Sample(text=row["text"])``; the text must not be empty."""
        return Sample(text=require_string(require_dict(row), "text"))
