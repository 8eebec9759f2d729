"""The data stage: read rows, pick their format, convert them to samples, render and tokenize them
with labels masked to the trained tokens, and optionally pack them into full-length rows.

Masks come from the rendered text, never from searching token ids for marker strings: for an
assistant turn ``i`` the trained characters are those that ``render(messages[:i+1])`` adds to
``render(messages[:i], add_generation_prompt=True)`` (the turn's content and its end-of-turn
token), and a token is trained when the middle of its character span falls inside them. A row's
first token is never trained: nothing before it predicts it.
"""

from __future__ import annotations

import bisect
import glob
import json
import random
import re
import weakref
from collections.abc import Iterator
from dataclasses import dataclass
from dataclasses import field
from pathlib import Path
from typing import Any

from ftengine.core.errors import DataError
from ftengine.core.types import Message
from ftengine.core.types import RowError
from ftengine.core.types import Sample

LOCAL_SUFFIXES = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}
DETECT_ROWS = 5
MAX_REASONS = 10
IGNORE = -100


@dataclass
class Row:
    source: str
    number: int  # 1-based row (line, for JSON Lines) number in ``source``
    value: Any

    @property
    def where(self) -> str:
        return f"{self.source}: row {self.number}"


@dataclass
class DataReport:
    """What the data stage did; shown in the summary and written to the run directory.

    Attributes:
        format: the dataset format used.
        rows: rows read (bad JSON lines included).
        samples: samples that reach the trainer (before packing).
        skipped: rows skipped (``data.on_bad_rows: skip``), with the first reasons in
            ``skip_reasons`` and a count per kind of problem in ``skip_kinds``.
        truncated: samples cut to ``max_seq_length``.
        tokens / trained_tokens: tokens after truncation, and those carrying loss.
        packed_rows / packing_efficiency: with ``data.packing``, the rows samples were packed into
            and the fraction of their ``max_seq_length`` slots holding tokens (not padding).
        images / image_tokens: vision-language runs: images in the samples, and the image tokens
            the processor expanded them into.
        eval: the report of ``data.eval_path`` (or ``{"samples": n}`` for a held-out fraction).
    """

    format: str = ""
    rows: int = 0
    samples: int = 0
    skipped: int = 0
    skip_reasons: list[str] = field(default_factory=list)
    skip_kinds: dict[str, int] = field(default_factory=dict)
    truncated: int = 0
    tokens: int = 0
    trained_tokens: int = 0
    packed_rows: int = 0
    packing_efficiency: float | None = None
    eval: dict[str, Any] | None = None
    images: int = 0
    image_tokens: int = 0

    def skip(self, reason: str, kind: str = "bad row") -> None:
        """Count one skipped row; ``reason`` names its file and row, ``kind`` groups it."""
        self.skipped += 1
        self.skip_kinds[kind] = self.skip_kinds.get(kind, 0) + 1
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
                value = json.loads(line)
            except json.JSONDecodeError as exc:
                reason = f"{path}: line {number}: not valid JSON ({exc.msg} at column {exc.colno})"
            except RecursionError:
                reason = f"{path}: line {number}: JSON nested too deeply to read"
            else:
                yield Row(str(path), number, value)
                continue
            if on_bad_rows == "error":
                raise DataError(reason + "; fix the line or set data.on_bad_rows: skip")
            report.rows += 1
            report.skip(reason, "not valid JSON")


def _read_with_datasets(path: Path) -> Iterator[Row]:
    import datasets

    kind = LOCAL_SUFFIXES[path.suffix]
    try:
        table = datasets.load_dataset(kind, data_files=str(path), split="train")
    except Exception as exc:
        raise DataError(f"{path}: cannot read as {kind}: {exc}") from None
    for number, row in enumerate(table, start=1):
        yield Row(str(path), number, row)


IN_MEMORY = "data"
"""What errors call rows passed as Python objects rather than a path (``data: row 3: ...``)."""


def source_name(path: Any) -> str:
    """How messages name a dataset: its path, or ``data`` for rows passed as Python objects."""
    return str(path) if isinstance(path, (str, Path)) else IN_MEMORY


def in_memory_rows(data: Any) -> list[Any] | None:
    """The rows of a ``datasets.Dataset``, a pandas ``DataFrame`` or a list of dicts; ``None`` for a path.

    Raises:
        DataError: an object that is neither a path nor one of those.
    """
    if isinstance(data, (str, Path)):
        return None
    if isinstance(data, (list, tuple)):
        return list(data)
    if hasattr(data, "to_dict") and hasattr(data, "columns") and hasattr(data, "iloc"):  # pandas DataFrame
        return data.to_dict(orient="records")
    if hasattr(data, "to_list") and hasattr(data, "column_names"):  # datasets.Dataset
        return data.to_list()
    raise DataError(f"expected a dataset path, a datasets.Dataset, a pandas DataFrame or a list of dicts, "
                    f"got {type(data).__name__}")


def read_rows(path: Any, *, split: str = "train", subset: str | None = None, on_bad_rows: str = "error",
              report: DataReport | None = None) -> Iterator[Row]:
    """Every row of a local file / directory / glob, of a hub dataset split, or of rows passed as a
    ``datasets.Dataset``, a pandas ``DataFrame`` or a list of dicts.

    JSON Lines files are read line by line, so a bad line is reported with its number (and, with
    ``on_bad_rows="skip"``, counted in ``report`` and skipped).
    """
    report = report if report is not None else DataReport()
    rows = in_memory_rows(path)
    if rows is not None:
        for number, row in enumerate(rows, start=1):
            yield Row(IN_MEMORY, number, row)
        return
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


def _problem_kind(exc: RowError) -> str:
    if not exc.field:
        return "bad row"
    return "bad field " + re.sub(r"\[\d+\]", "[]", exc.field)


def convert_rows(rows: list[Row], fmt: Any, on_bad_rows: str, report: DataReport) -> list[tuple[str, Sample]]:
    """Run the format's ``convert`` over every row; errors name file, row and field.

    Returns:
        ``(where, sample)`` pairs; ``where`` is ``"<file>: row <n>"`` for later messages.
    """
    samples = []
    for row in rows:
        try:
            if not isinstance(row.value, dict):
                raise RowError(f"expected a JSON object, got {type(row.value).__name__}")
            samples.append((row.where, fmt.convert(row.value)))
        except RowError as exc:
            where = row.where + (f": field {exc.field!r}" if exc.field else "")
            reason = one_line(f"{where}: {exc} (format {fmt.name})")
            if on_bad_rows == "error":
                raise DataError(reason + "; fix the row or set data.on_bad_rows: skip") from None
            report.skip(reason, "not an object" if not isinstance(row.value, dict) else _problem_kind(exc))
    return samples


def load_samples(path: Any, data: Any, report: DataReport) -> list[tuple[str, Sample]]:
    """Rows of ``path`` -> samples, as ``data`` (a :class:`~ftengine.core.config.DataConfig`) says:
    read, cut to ``max_rows``, columns renamed, ``instruction`` added to image+text rows, format detected
    or named, converted.

    Raises:
        DataError: unreadable input, no rows, an undetectable format, or (unless
            ``on_bad_rows`` is ``skip``) a bad row.
    """
    from ftengine.core import plugins

    rows = list(read_rows(path, split=data.split, subset=data.subset, on_bad_rows=data.on_bad_rows, report=report))
    if data.max_rows:
        rows = rows[: data.max_rows]
    instruction = getattr(data, "instruction", None)
    for row in rows:
        row.value = rename_columns(row.value, data.columns)
        if instruction and isinstance(row.value, dict) and "image" in row.value:  # image+text rows (format vision)
            row.value.setdefault("instruction", instruction)
    report.rows += len(rows)
    if not rows:
        raise DataError(f"{source_name(path)}: no rows")
    formats = plugins.get_registry("formats")
    if data.format == "auto":
        name = detect_format(rows, formats)
    else:
        name = data.format
        plugins.get("formats", name)
    report.format = name
    return convert_rows(rows, formats[name], data.on_bad_rows, report)


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


_PUTS_BOS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
"""Tokenizer -> whether it puts a BOS before what it encodes."""


def bos_prefix(tokenizer: Any, text: str) -> str:
    """The BOS token's text where the tokenizer puts one before what it encodes (Llama, Gemma, Mistral do;
    Qwen does not) and ``text`` does not start with it already: raw text trains as the tokenizer encodes
    it for inference (and as trl and transformers' language-modeling scripts train it). Chat templates
    write their own BOS."""
    bos = getattr(tokenizer, "bos_token", None)
    if not bos or text.startswith(bos):
        return ""
    if tokenizer not in _PUTS_BOS:  # asked once per tokenizer, not once per row
        ids = tokenizer("a")["input_ids"]
        _PUTS_BOS[tokenizer] = bool(ids) and ids[0] == tokenizer.bos_token_id
    return bos if _PUTS_BOS[tokenizer] else ""


def sample_text_and_spans(sample: Sample, tokenizer: Any, train_on: str) -> tuple[str, list[tuple[int, int]]]:
    """The text a sample trains on, and which character spans carry loss."""
    eos = tokenizer.eos_token or ""
    if sample.kind == "conversation":
        return conversation_spans(tokenizer, sample.messages, train_on)
    if sample.kind == "text":
        text = sample.text if eos and sample.text.endswith(eos) else sample.text + eos
        text = bos_prefix(tokenizer, text) + text
        return text, [(0, len(text))]
    if sample.kind == "completion":
        prompt = sample.prompt if isinstance(sample.prompt, str) else render(tokenizer, sample.prompt, True)
        prompt = bos_prefix(tokenizer, prompt) + prompt if isinstance(sample.prompt, str) else prompt
        text = prompt + sample.completion + eos
        return text, [(0, len(text))] if train_on == "all" else [(len(prompt), len(text))]
    if sample.kind == "segments":
        spans, text = [], ""
        for piece, trained in sample.segments:
            if trained:
                spans.append((len(text), len(text) + len(piece)))
            text += piece
        return text, spans
    raise DataError(f"a {sample.kind} sample cannot be tokenized for language-model training")


@dataclass
class Encoded:
    """A rendered sample, its tokens, their character spans in ``text``, and which carry loss."""

    text: str
    input_ids: list[int]
    offsets: list[tuple[int, int]]
    trained: list[bool]


def encode_text(tokenizer: Any, text: str, spans: list[tuple[int, int]]) -> Encoded:
    """Tokenize ``text`` (its special tokens are in the text already) and mark the tokens whose
    middle character falls in ``spans``; the first token is never trained."""
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = list(encoded["input_ids"])
    offsets = [tuple(o) for o in encoded["offset_mapping"]]
    trained = []
    for start, end in offsets:
        middle = (start + end) / 2 if end > start else start
        trained.append(any(s <= middle < e for s, e in spans))
    if trained:
        trained[0] = False
    return Encoded(text, ids, offsets, trained)


def encode_sample(sample: Sample, tokenizer: Any, train_on: str) -> Encoded:
    """Render and tokenize a language-model sample (conversation, completion, text or segments)."""
    text, spans = sample_text_and_spans(sample, tokenizer, train_on)
    return encode_text(tokenizer, text, spans)


def tokenize_sample(sample: Sample, tokenizer: Any, max_seq_length: int, train_on: str) -> dict[str, Any]:
    """``input_ids``/``labels`` (-100 where not trained) truncated to ``max_seq_length``."""
    return _row(encode_sample(sample, tokenizer, train_on), max_seq_length)


def _row(enc: Encoded, max_seq_length: int) -> dict[str, Any]:
    labels = [t if trained else IGNORE for t, trained in zip(enc.input_ids, enc.trained, strict=True)]
    return {"input_ids": enc.input_ids[:max_seq_length], "labels": labels[:max_seq_length]}


def preference_messages(sample: Sample) -> tuple[list[Message], list[Message], list[Message]]:
    """A preference sample as conversations: a string prompt becomes a user turn, a string
    chosen/rejected an assistant turn, so the chat template renders every pair."""
    prompt = [{"role": "user", "content": sample.prompt}] if isinstance(sample.prompt, str) else sample.prompt
    chosen = [{"role": "assistant", "content": sample.chosen}] if isinstance(sample.chosen, str) else sample.chosen
    rejected = ([{"role": "assistant", "content": sample.rejected}] if isinstance(sample.rejected, str)
                else sample.rejected)
    return prompt, chosen, rejected


def encode_completion(tokenizer: Any, prompt: list[Message], completion: list[Message]) -> Encoded:
    """``prompt + completion`` rendered and tokenized; the trained characters are those the
    completion adds to the prompt rendered with a generation prompt (as the DPO trainer splits them)."""
    head = render(tokenizer, prompt, add_generation_prompt=True)
    text = render(tokenizer, prompt + completion)
    start = 0
    while start < min(len(head), len(text)) and head[start] == text[start]:
        start += 1
    return encode_text(tokenizer, text, [(start, len(text))])


def as_turns(value: Any, role: str) -> list[Message]:
    """A string as one turn of ``role``; turns as they are."""
    return [{"role": role, "content": value}] if isinstance(value, str) else value


def encode_for_training(sample: Sample, tokenizer: Any, train_on: str) -> list[Encoded]:
    """The sequences a sample trains as: one for a language-model sample, the chosen and the rejected
    completion of a preference pair, the completion of an unpaired preference (as its trainer renders it)."""
    if sample.kind == "preference":
        prompt, chosen, rejected = preference_messages(sample)
        return [encode_completion(tokenizer, prompt, chosen), encode_completion(tokenizer, prompt, rejected)]
    if sample.kind == "unpaired_preference":
        prompt, completion = as_turns(sample.prompt, "user"), as_turns(sample.completion, "assistant")
        return [encode_completion(tokenizer, prompt, completion)]
    return [encode_sample(sample, tokenizer, train_on)]


def unusable(sequences: list[Encoded], max_seq_length: int) -> tuple[str, str] | None:
    """``(problem, kind)`` when a sample would train nothing after truncation to ``max_seq_length``
    (no trained token left in one of its sequences), else ``None``."""
    prompt_tokens = min(e.trained.index(True) if any(e.trained) else len(e.trained) for e in sequences)
    if len(sequences) > 1 and prompt_tokens >= max_seq_length:
        return f"the prompt alone ({prompt_tokens} tokens) fills max_seq_length={max_seq_length}", \
            "prompt fills max_seq_length"
    if not all(any(e.trained[:max_seq_length]) for e in sequences):
        return f"no trained tokens left after truncation to max_seq_length={max_seq_length}", "no trained tokens"
    return None


def count_sample(report: DataReport, sequences: list[Encoded], max_seq_length: int) -> None:
    """Add one usable sample to ``report``: its tokens and trained tokens after truncation, and
    whether truncation cut it. The run's data stage and ``ftengine data preview`` both count with it."""
    report.samples += 1
    report.truncated += int(any(len(e.input_ids) > max_seq_length for e in sequences))
    for e in sequences:
        report.tokens += min(len(e.input_ids), max_seq_length)
        report.trained_tokens += sum(e.trained[:max_seq_length])


def encode_and_count(samples: list[tuple[str, Sample]], tokenizer: Any, max_seq_length: int, train_on: str,
                     on_bad_rows: str, report: DataReport) -> Iterator[tuple[Sample, list[Encoded]]]:
    """Each usable sample with its encoded sequences, counted in ``report``.

    A sample the chat template rejects, or that would train nothing after truncation, is an error
    naming its row (or, with ``on_bad_rows="skip"``, skipped and reported).
    """
    for where, sample in samples:
        try:
            sequences = encode_for_training(sample, tokenizer, train_on)
        except Exception as exc:  # the template's own raise_exception, or a turn it renders oddly
            sample_problem(where, f"the chat template cannot render it: {exc}", on_bad_rows, report,
                            "chat template error")
            continue
        problem = unusable(sequences, max_seq_length)
        if problem is not None:
            sample_problem(where, problem[0], on_bad_rows, report, problem[1])
            continue
        count_sample(report, sequences, max_seq_length)
        yield sample, sequences


def one_line(text: str) -> str:
    """A message quoting row data on one line: line breaks and other control characters escaped."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def sample_problem(where: str, problem: str, on_bad_rows: str, report: DataReport, kind: str) -> None:
    """A sample that cannot train: a :class:`DataError` naming its row, or (``on_bad_rows: skip``) counted
    in ``report`` under ``kind`` with the reason."""
    reason = one_line(f"{where}: {problem}")
    if on_bad_rows == "error":
        raise DataError(reason + "; fix the row or set data.on_bad_rows: skip") from None
    report.skip(reason, kind)


def tokenize_samples(samples: list[tuple[str, Sample]], tokenizer: Any, max_seq_length: int, train_on: str,
                     on_bad_rows: str, report: DataReport) -> list[dict[str, Any]]:
    """Tokenized rows with masked labels (:func:`encode_and_count`)."""
    return [_row(sequences[0], max_seq_length)
            for _, sequences in encode_and_count(samples, tokenizer, max_seq_length, train_on, on_bad_rows, report)]


def pack_bins(lengths: list[int], max_seq_length: int) -> list[list[int]]:
    """Indices of ``lengths`` grouped into bins of at most ``max_seq_length`` total (best-fit decreasing:
    longest first, each into the fullest bin it still fits)."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    free: list[tuple[int, int]] = []  # (room left, bin), sorted: the best fit is the first with enough room
    bins: list[list[int]] = []
    for i in order:
        n = lengths[i]
        k = bisect.bisect_left(free, (n, -1))
        if k == len(free):
            bins.append([i])
            b, room = len(bins) - 1, max_seq_length - n
        else:
            room, b = free.pop(k)
            bins[b].append(i)
            room -= n
        if room > 0:
            bisect.insort(free, (room, b))
    return bins


def pack_rows(rows: list[dict[str, Any]], max_seq_length: int) -> list[dict[str, Any]]:
    """Pack tokenized rows into rows of at most ``max_seq_length`` tokens (:func:`pack_bins`).

    Each packed row concatenates whole samples; ``position_ids`` restart at 0 for each sample (the
    model builds a block-diagonal causal mask from them, so attention never crosses a sample
    boundary), and each sample's first label is -100 (no loss for predicting sample B's first
    token from sample A).

    Args:
        rows: ``{"input_ids", "labels"}`` dicts, each at most ``max_seq_length`` long.
        max_seq_length: the packed rows' length limit.

    Returns:
        ``{"input_ids", "labels", "position_ids"}`` dicts.
    """
    packed = []
    for members in pack_bins([len(r["input_ids"]) for r in rows], max_seq_length):
        ids: list[int] = []
        labels: list[int] = []
        positions: list[int] = []
        for i in members:
            row = rows[i]
            ids += row["input_ids"]
            labels += [IGNORE] + list(row["labels"][1:])
            positions += range(len(row["input_ids"]))
        packed.append({"input_ids": ids, "labels": labels, "position_ids": positions})
    return packed


def packing_efficiency(lengths: list[int], n_rows: int, max_seq_length: int) -> float:
    """The fraction of ``n_rows * max_seq_length`` token slots that hold tokens."""
    return sum(lengths) / max(n_rows * max_seq_length, 1)


def pack(rows: list[dict[str, Any]], max_seq_length: int, report: DataReport) -> list[dict[str, Any]]:
    """:func:`pack_rows`, with the packed row count and the packing efficiency in ``report``."""
    packed = pack_rows(rows, max_seq_length)
    report.packed_rows += len(packed)
    report.packing_efficiency = packing_efficiency([len(r["input_ids"]) for r in packed], len(packed), max_seq_length)
    return packed


def split_eval(samples: list[Any], fraction: float, seed: int) -> tuple[list[Any], list[Any]]:
    """Hold out ``fraction`` of the samples (at least one when the fraction is positive), seeded."""
    if fraction <= 0 or len(samples) < 2:
        return samples, []
    order = list(range(len(samples)))
    random.Random(seed).shuffle(order)
    n_eval = max(1, int(round(len(samples) * fraction)))
    held = set(order[:n_eval])
    return [s for i, s in enumerate(samples) if i not in held], [s for i, s in enumerate(samples) if i in held]
