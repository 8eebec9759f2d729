"""The data stage: read rows, pick their format, convert them to samples, render and tokenize them
with labels masked to the trained tokens.

Masks come from the rendered text, never from searching token ids for marker strings: for an
assistant turn ``i`` the trained characters are those that ``render(messages[:i+1])`` adds to
``render(messages[:i], add_generation_prompt=True)`` (the turn's content and its end-of-turn
token), and a token is trained when the middle of its character span falls inside them.
"""

from __future__ import annotations

import glob
import json
import random
from collections.abc import Iterator
from dataclasses import dataclass
from dataclasses import field
from pathlib import Path
from typing import Any

from ftengine.core.errors import DataError
from ftengine.core.types import RowError
from ftengine.core.types import Sample

LOCAL_SUFFIXES = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}
DETECT_ROWS = 5
MAX_REASONS = 10


@dataclass
class Row:
    source: str
    number: int  # 1-based row (line, for JSON Lines) number in ``source``
    value: Any


@dataclass
class DataReport:
    """What the data stage did; shown in the summary and written to the run directory."""

    format: str = ""
    rows: int = 0
    samples: int = 0
    skipped: int = 0
    skip_reasons: list[str] = field(default_factory=list)
    truncated: int = 0
    tokens: int = 0
    trained_tokens: int = 0

    def skip(self, reason: str) -> None:
        self.skipped += 1
        if len(self.skip_reasons) < MAX_REASONS:
            self.skip_reasons.append(reason)

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def resolve_files(path: str) -> list[Path] | None:
    """Local files behind ``path`` (a file, a directory or a glob), or ``None`` for a hub id."""
    candidate = Path(path).expanduser()
    if candidate.is_file():
        return [candidate]
    if candidate.is_dir():
        files = sorted(p for p in candidate.rglob("*") if p.suffix in LOCAL_SUFFIXES and p.is_file())
        if not files:
            raise DataError(f"{path}: directory holds no {', '.join(LOCAL_SUFFIXES)} files")
        return files
    if any(ch in path for ch in "*?["):
        files = sorted(Path(p) for p in glob.glob(path, recursive=True) if Path(p).suffix in LOCAL_SUFFIXES)
        if not files:
            raise DataError(f"{path}: the pattern matches no {', '.join(LOCAL_SUFFIXES)} files")
        return files
    looks_local = path.startswith((".", "/", "~")) or Path(path).suffix in LOCAL_SUFFIXES or path.count("/") > 1
    if looks_local:
        raise DataError(f"{path}: dataset file not found")
    return None


def _read_jsonl(path: Path, on_bad_rows: str, report: DataReport) -> Iterator[Row]:
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                yield Row(str(path), number, json.loads(line))
            except json.JSONDecodeError as exc:
                reason = f"{path}: line {number}: not valid JSON ({exc.msg} at column {exc.colno})"
                if on_bad_rows == "error":
                    raise DataError(reason) from None
                report.skip(reason)


def _read_with_datasets(path: Path) -> Iterator[Row]:
    import datasets

    kind = LOCAL_SUFFIXES[path.suffix]
    try:
        table = datasets.load_dataset(kind, data_files=str(path), split="train")
    except Exception as exc:
        raise DataError(f"{path}: cannot read as {kind}: {exc}") from None
    for number, row in enumerate(table, start=1):
        yield Row(str(path), number, row)


def read_rows(path: str, *, split: str = "train", subset: str | None = None, on_bad_rows: str = "error",
              report: DataReport | None = None) -> Iterator[Row]:
    """Every row of a local file / directory / glob, or of a hub dataset split."""
    report = report if report is not None else DataReport()
    files = resolve_files(path)
    if files is None:
        import datasets

        try:
            table = datasets.load_dataset(path, subset, split=split)
        except Exception as exc:
            raise DataError(f"{path}: cannot load hub dataset (split {split!r}): {exc}") from None
        for number, row in enumerate(table, start=1):
            yield Row(f"{path}[{split}]", number, row)
        return
    for file in files:
        if file.suffix == ".jsonl":
            yield from _read_jsonl(file, on_bad_rows, report)
        else:
            yield from _read_with_datasets(file)


def rename_columns(value: Any, columns: dict[str, str]) -> Any:
    if not columns or not isinstance(value, dict):
        return value
    return {columns.get(k, k): v for k, v in value.items()}


def detect_format(rows: list[Row], formats: dict[str, Any]) -> str:
    """The one format whose ``detect`` accepts all of the first rows; a :class:`DataError` showing
    the rows' keys and the known formats when none or several do."""
    sample = [r for r in rows[:DETECT_ROWS] if isinstance(r.value, dict)]
    if not sample:
        raise DataError("cannot detect the data format: the first rows are not JSON objects")
    matches = [name for name, fmt in formats.items() if all(_safe_detect(fmt, r.value) for r in sample)]
    keys = sorted(sample[0].value)
    known = ", ".join(f"{n} ({fmt.description})" for n, fmt in sorted(formats.items()))
    where = f"{sample[0].source}: row {sample[0].number}"
    if not matches:
        raise DataError(f"{where}: no known format matches a row with keys {keys}; set data.format (and "
                        f"data.columns to rename fields). Known formats: {known}")
    if len(matches) > 1:
        raise DataError(f"{where}: keys {keys} match several formats ({', '.join(sorted(matches))}); "
                        f"set data.format to one of them")
    return matches[0]


def _safe_detect(fmt: Any, row: dict[str, Any]) -> bool:
    try:
        return bool(fmt.detect(row))
    except Exception:
        return False


def convert_rows(rows: list[Row], fmt: Any, on_bad_rows: str, report: DataReport) -> list[Sample]:
    """Run the format's ``convert`` over every row; errors name file, row and field."""
    samples = []
    for row in rows:
        try:
            if not isinstance(row.value, dict):
                raise RowError(f"expected a JSON object, got {type(row.value).__name__}")
            samples.append(fmt.convert(row.value))
        except RowError as exc:
            where = f"{row.source}: row {row.number}" + (f": field {exc.field!r}" if exc.field else "")
            reason = f"{where}: {exc} (format {fmt.name})"
            if on_bad_rows == "error":
                raise DataError(reason + "; fix the row or set data.on_bad_rows: skip") from None
            report.skip(reason)
    return samples


# ----------------------------------------------------------------------------- tokenization


RENDER_DATE = "26 Jul 2024"
"""The date templates that print one (Llama 3.x) render, so training data does not change by the day."""


def render(tokenizer: Any, messages: list[dict[str, Any]], add_generation_prompt: bool = False) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt,
                                         date_string=RENDER_DATE)


def conversation_spans(tokenizer: Any, messages: list[dict[str, Any]], train_on: str) -> tuple[str, list[tuple]]:
    """The rendered conversation and the character spans to train on."""
    text = render(tokenizer, messages)
    if train_on == "all":
        return text, [(0, len(text))]
    turns = [i for i, m in enumerate(messages) if m.get("role") == "assistant"]
    if train_on == "last":
        turns = turns[-1:]
    spans = []
    for i in turns:
        before = render(tokenizer, messages[:i], add_generation_prompt=True)
        through = render(tokenizer, messages[: i + 1])
        eos = getattr(tokenizer, "eos_token", None) or ""
        if eos and not text.startswith(through) and through.endswith(eos) and text.startswith(through[: -len(eos)]):
            # Templates such as Phi-3's close any render without a generation prompt with an EOS
            # that the whole conversation has only at its end.
            through = through[: -len(eos)]
        if through.startswith(before) and text.startswith(through):
            spans.append((len(before), len(through)))
            continue
        # A template whose render of a prefix is not a prefix of the whole (e.g. one that drops
        # reasoning from earlier turns): find the turn's content after the previous span instead.
        content = messages[i].get("content") or ""
        start = text.find(content, spans[-1][1] if spans else 0) if content else -1
        if start < 0:
            raise DataError(f"cannot locate assistant turn {i} in the rendered conversation; the chat template "
                            f"renders it differently from its content")
        end = start + len(content)
        if eos and text.startswith(eos, end):
            end += len(eos)
        spans.append((start, end))
    return text, spans


def sample_text_and_spans(sample: Sample, tokenizer: Any, train_on: str) -> tuple[str, list[tuple[int, int]]]:
    """The text a sample trains on, and which character spans carry loss."""
    eos = tokenizer.eos_token or ""
    if sample.kind == "conversation":
        return conversation_spans(tokenizer, sample.messages, train_on)
    if sample.kind == "text":
        text = sample.text + eos
        return text, [(0, len(text))]
    if sample.kind == "completion":
        prompt = sample.prompt if isinstance(sample.prompt, str) else render(tokenizer, sample.prompt, True)
        text = prompt + sample.completion + eos
        return text, [(0, len(text))] if train_on == "all" else [(len(prompt), len(text))]
    raise DataError(f"a {sample.kind} sample cannot be tokenized for language-model training")


def tokenize_sample(sample: Sample, tokenizer: Any, max_seq_length: int, train_on: str) -> dict[str, Any]:
    """``input_ids``/``labels`` (-100 where not trained) truncated to ``max_seq_length``."""
    text, spans = sample_text_and_spans(sample, tokenizer, train_on)
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = list(encoded["input_ids"])
    labels = []
    for token_id, (start, end) in zip(ids, encoded["offset_mapping"], strict=True):
        middle = (start + end) / 2 if end > start else start
        trained = any(s <= middle < e for s, e in spans)
        labels.append(token_id if trained else -100)
    truncated = len(ids) > max_seq_length
    return {"input_ids": ids[:max_seq_length], "labels": labels[:max_seq_length], "truncated": truncated}


def split_eval(samples: list[Any], fraction: float, seed: int) -> tuple[list[Any], list[Any]]:
    """Hold out ``fraction`` of the samples (at least one when the fraction is positive), seeded."""
    if fraction <= 0 or len(samples) < 2:
        return samples, []
    order = list(range(len(samples)))
    random.Random(seed).shuffle(order)
    n_eval = max(1, int(round(len(samples) * fraction)))
    held = set(order[:n_eval])
    return [s for i, s in enumerate(samples) if i not in held], [s for i, s in enumerate(samples) if i in held]
