"""The Python API's vision-language path: :func:`ftengine.load_model` returns the model's processor, and
:func:`ftengine.load_dataset` / :func:`ftengine.train` take it where a text model takes its tokenizer.

A dataset of image conversations keeps its rows (images opened) beside the ``datasets.Dataset`` that the
trainer iterates (row numbers, as in a config run): Arrow cannot hold opened images next to string
contents. :func:`collated` joins a training and an evaluation set under one
:class:`~ftengine.engine.vision.VisionCollator`.
"""

from __future__ import annotations

from typing import Any

from ftengine.core import plugins
from ftengine.core.errors import DataError
from ftengine.engine import vision
from ftengine.engine.data import DataReport
from ftengine.engine.data import load_samples

ROWS_ATTR = "ftengine_rows"
TRAIN_ON_ATTR = "ftengine_train_on"


def is_processor(tokenizer: Any) -> bool:
    """Whether ``tokenizer`` is a vision-language model's processor (it carries an image processor)."""
    return getattr(tokenizer, "image_processor", None) is not None


def images_per_turn_limit(processor: Any) -> int | None:
    """The most images one message may hold for the model this processor serves (its adapter's
    ``vision.max_images_per_turn``), found through transformers' model type -> processor class table."""
    from transformers.models.auto.processing_auto import PROCESSOR_MAPPING_NAMES

    name = type(processor).__name__
    for model_type, processor_name in PROCESSOR_MAPPING_NAMES.items():
        if processor_name == name:
            adapter = plugins.adapter_for_model_type(model_type)
            limit = getattr(getattr(adapter, "vision", None), "max_images_per_turn", None)
            if limit is not None:
                return limit
    return None


def vision_dataset(data: Any, processor: Any, config: Any, max_seq_length: int, report: DataReport,
                   sample_kinds: tuple[str, ...] = ("conversation",)) -> Any:
    """Rows of image conversations as a ``datasets.Dataset`` of row numbers, the rows themselves on it.

    Raises:
        DataError: a trainer that takes no conversations; a bad row (naming file and row), unless
            ``config.on_bad_rows`` is skip; no usable row.
    """
    import datasets

    if "conversation" not in sample_kinds:
        raise DataError("load_dataset: this trainer does not train on image conversations; use sft")

    samples = load_samples(data, config, report)
    rows = vision.vision_rows(samples, processor, max_seq_length, config.train_on, config.on_bad_rows, report,
                              images_per_turn_limit(processor))
    if not rows:
        raise DataError(f"{config.path or 'the rows'}: no usable image conversation ({report.skipped} skipped)")
    dataset = datasets.Dataset.from_list([{"row": i} for i in range(len(rows))])
    setattr(dataset, ROWS_ATTR, rows)
    setattr(dataset, TRAIN_ON_ATTR, config.train_on)
    return dataset


def collated(processor: Any, train: Any, evaluation: Any = None) -> tuple[Any, Any, vision.VisionCollator]:
    """The training and evaluation sets renumbered into one list of rows, and the collator over it.

    Raises:
        DataError: a set that :func:`vision_dataset` did not make (a mapped or filtered copy loses its rows).
    """
    import datasets

    parts = [d for d in (train, evaluation) if d is not None]
    if any(getattr(d, ROWS_ATTR, None) is None for d in parts):
        raise DataError("train: a vision-language model trains on the dataset ftengine.load_dataset(data, processor) "
                        "returns (rows with their images; a mapped or filtered copy loses them)")
    rows = [row for d in parts for row in getattr(d, ROWS_ATTR)]
    n_train = len(getattr(train, ROWS_ATTR))
    train_ds = datasets.Dataset.from_list([{"row": i} for i in range(n_train)])
    eval_ds = (datasets.Dataset.from_list([{"row": n_train + i} for i in range(len(rows) - n_train)])
               if evaluation is not None else None)
    return train_ds, eval_ds, vision.VisionCollator(processor, rows, getattr(train, TRAIN_ON_ATTR))
