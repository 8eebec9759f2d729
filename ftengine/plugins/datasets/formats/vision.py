"""``vision``: image+text rows, ``{"image": ..., "text": ...}`` (the LaTeX-OCR layout).

Each row becomes a user turn (the row's ``instruction``, else ``data.instruction``, then the image)
and an assistant turn (the text). ``data.columns`` renames other layouts to ``image``/``text``.
"""

from __future__ import annotations

from typing import Any

from ftengine.core.types import RowError
from ftengine.core.types import Sample
from ftengine.plugins.datasets.formats.common import optional_string
from ftengine.plugins.datasets.formats.common import require_dict
from ftengine.plugins.datasets.formats.common import require_field
from ftengine.plugins.datasets.formats.common import require_string


class VisionFormat:
    """One image and the text to produce from it; an optional ``instruction`` leads the user's turn."""

    name = "vision"
    description = 'image+text: {"image": "formula.png", "text": "\\\\frac{a}{b}"} (+ data.instruction)'

    def detect(self, row: dict[str, Any]) -> bool:
        """True for a row with an ``image`` and a string ``text`` and no conversation fields."""
        return (isinstance(row, dict) and row.get("image") is not None and isinstance(row.get("text"), str)
                and "messages" not in row and "conversations" not in row)

    def convert(self, row: dict[str, Any]) -> Sample:
        """user: instruction (when given) + image; assistant: the text."""
        row = require_dict(row)
        image = require_field(row, "image")
        if isinstance(image, list):
            raise RowError("field 'image' must hold one image (a path, bytes or an image), got a list", field="image")
        text = require_string(row, "text")
        instruction = optional_string(row, "instruction")
        user = ([{"type": "text", "text": instruction}] if instruction else []) + [{"type": "image", "image": image}]
        return Sample(messages=[{"role": "user", "content": user}, {"role": "assistant", "content": text}])
