"""Calibration tokens for an importance matrix: from a text/JSONL file, or from the run's training rows."""

from __future__ import annotations

import json
import random
from collections.abc import Iterator
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ftengine.core.errors import ExportError


def _strings(value: Any) -> Iterator[str]:
    """Every string inside a JSON value, depth first (message contents, prompt/completion fields...)."""
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for item in value.values():
            yield from _strings(item)
    elif isinstance(value, list):
        for item in value:
            yield from _strings(item)


def rows_from_file(path: str | Path, tokenizer: Any) -> list[list[int]]:
    """Token rows of a calibration file: a ``.json``/``.jsonl`` file (each record's strings joined by
    newlines) or plain text (paragraphs, split at blank lines).

    Raises:
        ExportError: the file is missing, a JSON line does not parse, or there is no text.
    """
    path = Path(path)
    if not path.is_file():
        raise ExportError(f"imatrix_data: no file {path}")
    raw = path.read_text(encoding="utf-8")
    if path.suffix in (".jsonl", ".json"):
        records: list[Any] = []
        if path.suffix == ".json":
            loaded = json.loads(raw)
            records = loaded if isinstance(loaded, list) else [loaded]
        else:
            for number, line in enumerate(raw.splitlines(), 1):
                if line.strip():
                    try:
                        records.append(json.loads(line))
                    except json.JSONDecodeError as exc:
                        raise ExportError(f"{path}:{number}: not a JSON line ({exc.msg})") from exc
        texts = ["\n".join(_strings(record)) for record in records]
    else:
        texts = raw.split("\n\n")
    rows = [tokenizer(text, add_special_tokens=False)["input_ids"] for text in texts if text.strip()]
    if not rows:
        raise ExportError(f"imatrix_data: {path} holds no text")
    return rows


def rows_from_dataset(dataset: Sequence[Any], tokenizer: Any, seed: int = 0) -> Iterator[Sequence[int]]:
    """Token rows of training samples in a seeded random order (a sample of the whole set, not its head).

    Rows with ``input_ids`` are used as they are; others (preference pairs, raw text) are tokenized
    from their strings.
    """
    order = list(range(len(dataset)))
    random.Random(seed).shuffle(order)
    for index in order:
        row = dataset[index]
        if isinstance(row, dict) and "input_ids" in row:
            yield row["input_ids"]
        else:
            text = "\n".join(_strings(row))
            if text.strip():
                yield tokenizer(text, add_special_tokens=False)["input_ids"]
