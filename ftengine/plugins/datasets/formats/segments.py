"""``segments``: template-free rows of text pieces, each saying whether it is trained."""

from __future__ import annotations

from typing import Any

from ftengine.core.types import RowError
from ftengine.core.types import Sample
from ftengine.plugins.datasets.formats.common import require_dict
from ftengine.plugins.datasets.formats.common import require_field


class SegmentsFormat:
    """``{"segments": [{"text": ..., "label": true|false}, ...]}``: the pieces are joined as they are
    (no chat template, no EOS added) and only the ``label: true`` pieces carry loss."""

    name = "segments"
    description = 'Template-free pieces: {"segments": [{"text": ..., "label": true|false}]} (label: trained)'
    needs_chat_template = False

    def detect(self, row: dict[str, Any]) -> bool:
        """True for a row whose ``segments`` is a list of objects with ``text`` and ``label``."""
        segments = row.get("segments") if isinstance(row, dict) else None
        return isinstance(segments, list) and bool(segments) and all(
            isinstance(s, dict) and "text" in s and "label" in s for s in segments)

    def convert(self, row: dict[str, Any]) -> Sample:
        """``Sample(segments=[(text, label), ...])``; at least one piece must be trained."""
        segments = require_field(require_dict(row), "segments")
        if not isinstance(segments, list) or not segments:
            raise RowError("field 'segments' must be a non-empty list of {text, label} objects", field="segments")
        pieces = []
        for i, segment in enumerate(segments):
            where = f"segments[{i}]"
            if not isinstance(segment, dict):
                raise RowError(f"{where} must be an object with text and label, got {type(segment).__name__}",
                               field=where)
            text, label = segment.get("text"), segment.get("label")
            if not isinstance(text, str):
                raise RowError(f"{where}.text must be a string, got {type(text).__name__}", field=f"{where}.text")
            if not isinstance(label, bool):
                raise RowError(f"{where}.label must be true or false, got {label!r}", field=f"{where}.label")
            pieces.append((text, label))
        if not any(label for _, label in pieces):
            raise RowError("no segment has label: true, so nothing would be trained", field="segments")
        return Sample(segments=pieces)
