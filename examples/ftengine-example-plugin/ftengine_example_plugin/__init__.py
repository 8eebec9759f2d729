"""The ``qa`` dataset format: ``{"question": ..., "answer": ..., "context": optional}`` rows."""

from __future__ import annotations

from typing import Any

from ftengine.plugin import RowError
from ftengine.plugin import Sample
from ftengine.plugin import hookimpl


class QAFormat:
    name = "qa"
    description = "question/answer pairs, with an optional context"

    def detect(self, row: dict[str, Any]) -> bool:
        return "question" in row and "answer" in row

    def convert(self, row: dict[str, Any]) -> Sample:
        for key in ("question", "answer"):
            if not isinstance(row.get(key), str) or not row[key].strip():
                raise RowError(f"expected a non-empty string in {key!r}", field=key)
        question = row["question"]
        if row.get("context"):
            question = f"{row['context']}\n\n{question}"
        return Sample(messages=[{"role": "user", "content": question},
                                {"role": "assistant", "content": row["answer"]}])


@hookimpl
def register_formats(register):
    register(QAFormat())
