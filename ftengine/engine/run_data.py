"""Stage 4: the configured data as the trainer's train and eval datasets (tokenized, masked, packed; or
conversations with their images for a vision-language model)."""

from __future__ import annotations

import logging
from itertools import islice
from typing import TYPE_CHECKING
from typing import Any

from ftengine.core import plugins
from ftengine.core.config import DataConfig
from ftengine.core.config import RunConfig
from ftengine.core.errors import DataError
from ftengine.engine import vision
from ftengine.engine.conversational_rows import preference_rows
from ftengine.engine.conversational_rows import prompt_rows
from ftengine.engine.conversational_rows import unpaired_preference_rows
from ftengine.engine.data import DETECT_ROWS
from ftengine.engine.data import DataReport
from ftengine.engine.data import detect_format
from ftengine.engine.data import load_samples
from ftengine.engine.data import pack
from ftengine.engine.data import read_rows
from ftengine.engine.data import rename_columns
from ftengine.engine.data import source_name
from ftengine.engine.data import split_eval
from ftengine.engine.data import tokenize_samples
from ftengine.engine.templates import apply_chat_template

if TYPE_CHECKING:
    from ftengine.engine.pipeline import LoadedModel

log = logging.getLogger("ftengine")


def choose_chat_template(tokenizer: Any, name: str | None, adapter: Any) -> str:
    """The template a run uses: the configured one, else the tokenizer's own, else the adapter's."""
    if name:
        return name
    if getattr(tokenizer, "chat_template", None):
        return "tokenizer"
    default = getattr(adapter, "default_chat_template", None)
    if default and default in plugins.get_registry("chat_templates"):
        return default
    return "chatml"


def needs_chat_template(path: Any, data: DataConfig) -> bool:
    """Whether the rows need a chat template: a configured ``data.chat_template`` is always applied; otherwise
    not when the rows' format (named, or detected on the first rows) says ``needs_chat_template = False``
    (raw text, segments), so a tokenizer lacking the default template's tokens still trains on them."""
    if data.chat_template:
        return True
    name = data.format
    if name == "auto":
        rows = list(islice(read_rows(path, split=data.split, subset=data.subset), DETECT_ROWS))
        for row in rows:
            row.value = rename_columns(row.value, data.columns)
        try:
            name = detect_format(rows, plugins.get_registry("formats"))
        except DataError:
            return True  # the data stage reports it with the rows' full context
    return getattr(plugins.get("formats", name), "needs_chat_template", True)


def prepare_dataset(path: Any, tokenizer: Any, data: DataConfig, max_seq_length: int, sample_kinds: tuple[str, ...],
                    report: DataReport) -> list[Any]:
    """Rows -> samples -> rows for the trainer: tokenized with masked labels (and packed when
    ``data.packing``) for language-model trainers, conversational preference pairs for DPO.

    Raises:
        DataError: bad input (naming file, row and field), or samples the trainer cannot train on.
    """
    samples = load_samples(path, data, report)
    vision.reject_images(samples)
    if data.format == "auto":
        log.info("data format: detected %r", report.format)
    wrong = sorted({s.kind for _, s in samples} - set(sample_kinds))
    if wrong:
        raise DataError(f"{source_name(path)}: format {report.format!r} gives {', '.join(wrong)} samples, which "
                        f"this trainer does not train on (it takes {', '.join(sample_kinds)})")
    conversational = {"preference": preference_rows, "unpaired_preference": unpaired_preference_rows,
                      "prompt": prompt_rows}
    kind = next((k for k in sample_kinds if k in conversational), None)
    if kind is not None:
        if data.packing:
            raise DataError(f"data.packing: {kind.replace('_', ' ')} rows are not packed; set it to false for this "
                            f"trainer")
        rows = conversational[kind](samples, tokenizer, max_seq_length, data.on_bad_rows, report)
    else:
        rows = tokenize_samples(samples, tokenizer, max_seq_length, data.train_on, data.on_bad_rows, report)
        if data.packing:
            rows = pack(rows, max_seq_length, report)
    if report.skipped:
        log.warning("%s: %d bad row(s) skipped, e.g. %s", source_name(path), report.skipped, report.skip_reasons[0])
    return rows


def to_dataset(rows: list[dict[str, Any]]) -> Any:
    """A ``datasets.Dataset`` of the rows :func:`prepare_dataset` returned."""
    import datasets

    return datasets.Dataset.from_list(rows)


def data(loaded: LoadedModel, config: RunConfig) -> tuple[Any, Any, DataReport]:
    """Stage 4: train and eval datasets for the configured trainer.

    A held-out eval fraction is split off before packing, so no sample is in both.
    """
    d = config.data
    if not d.path:
        raise DataError("data.path: required for a run (a .jsonl/.json/.parquet/.csv file, directory, glob or "
                        "hub dataset id)")
    if needs_chat_template(d.path, d):
        template = choose_chat_template(loaded.tokenizer, d.chat_template, loaded.adapter)
        apply_chat_template(loaded.tokenizer, template)
        loaded.notes.append(f"chat template: {template}")
    else:
        loaded.notes.append("chat template: none (the format is template-free)")
    trainer = plugins.get("trainers", config.training.trainer)
    max_seq_length = loaded.settings.max_seq_length
    report = DataReport()
    if loaded.processor is not None or d.format == "vision":
        return vision_data(loaded, config, trainer, report)
    split_first = d.packing and not d.eval_path and d.eval_fraction > 0
    unpacked = d.model_copy(update={"packing": False}) if split_first else d
    train_rows = prepare_dataset(d.path, loaded.tokenizer, unpacked, max_seq_length, trainer.sample_kinds, report)
    eval_rows: list[Any] = []
    if d.eval_path:
        eval_report = DataReport()
        eval_rows = prepare_dataset(d.eval_path, loaded.tokenizer, d, max_seq_length, trainer.sample_kinds,
                                    eval_report)
        report.eval = eval_report.to_dict()
    elif d.eval_fraction > 0:
        train_rows, eval_rows = split_eval(train_rows, d.eval_fraction, d.seed)
        report.eval = {"samples": len(eval_rows)}
        if split_first:
            train_rows = pack(train_rows, max_seq_length, report)
            eval_rows = pack(eval_rows, max_seq_length, DataReport())
    if not train_rows:
        raise DataError(f"{d.path}: no usable training samples ({report.skipped} skipped)")
    if d.packing:
        loaded.notes.append(f"packing: {report.packed_rows} rows of {max_seq_length} tokens "
                            f"({report.packing_efficiency:.0%} of token slots filled)")
    return to_dataset(train_rows), (to_dataset(eval_rows) if eval_rows else None), report


def vision_data(loaded: LoadedModel, config: RunConfig, trainer: Any,
                report: DataReport) -> tuple[Any, Any, DataReport]:
    """Stage 4 for a vision-language model: conversations with their images opened, batched by
    :class:`~ftengine.engine.vision.VisionCollator` (no packing; a held-out fraction as in text runs)."""
    d = config.data
    if loaded.processor is None:
        raise DataError(f"{d.path}: format vision needs a vision-language model; "
                        f"{config.model.name_or_path} has no vision tower")
    if d.packing:
        raise DataError("data.packing: rows with images are not packed; set it to false for a vision-language model")
    if "conversation" not in trainer.sample_kinds:
        raise DataError(f"training.trainer: {config.training.trainer!r} does not train on image conversations; use sft")
    loaded.processor.chat_template = loaded.tokenizer.chat_template or loaded.processor.chat_template
    max_seq_length = loaded.settings.max_seq_length

    def rows_of(path: str, part: DataReport) -> list[dict[str, Any]]:
        samples = load_samples(path, d, part)
        return vision.vision_rows(samples, loaded.processor, max_seq_length, d.train_on, d.on_bad_rows, part,
                                  getattr(getattr(loaded.adapter, "vision", None), "max_images_per_turn", None))

    train_rows, eval_rows = rows_of(d.path, report), []
    if d.eval_path:
        eval_report = DataReport()
        eval_rows = rows_of(d.eval_path, eval_report)
        report.eval = eval_report.to_dict()
    elif d.eval_fraction > 0:
        train_rows, eval_rows = split_eval(train_rows, d.eval_fraction, d.seed)
        report.eval = {"samples": len(eval_rows)}
    if not train_rows:
        raise DataError(f"{d.path}: no usable training samples ({report.skipped} skipped)")
    loaded.notes.append(f"images: {report.images} in {report.samples} samples, {report.image_tokens} image tokens")
    loaded.collator = vision.VisionCollator(loaded.processor, train_rows + eval_rows, d.train_on)
    train_ds = to_dataset([{"row": i} for i in range(len(train_rows))])
    eval_ds = to_dataset([{"row": len(train_rows) + i} for i in range(len(eval_rows))]) if eval_rows else None
    return train_ds, eval_ds, report
