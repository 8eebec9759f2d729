"""The Python API's vision-language path: :func:`ftengine.load_model` returns the model's processor, and
:func:`ftengine.load_dataset` / :func:`ftengine.train` take it where a text model takes its tokenizer.

A dataset of image conversations keeps its rows (images opened) beside the ``datasets.Dataset`` that the
trainer iterates: Arrow cannot hold opened images next to string contents. The dataset holds each row's
number and the key of its row set (``row``, ``row_set``), so that a copy made with ``select``,
``shuffle``, ``filter``, ``train_test_split`` or a ``map`` that keeps those columns still finds its
rows. :func:`collated` joins a training and an evaluation set under one
:class:`~ftengine.engine.vision.VisionCollator`.
"""

from __future__ import annotations

import uuid
from typing import Any

from ftengine.core import plugins
from ftengine.core.errors import DataError
from ftengine.engine import vision
from ftengine.engine.data import DataReport
from ftengine.engine.data import load_samples

ROW_COLUMNS = ("row", "row_set")
_ROW_SETS: dict[str, tuple[list[Any], str]] = {}
"""Row-set key -> (the rows, the dataset's ``train_on``), for every set :func:`vision_dataset` made in this process."""


def is_vision_dataset(dataset: Any) -> bool:
    """Whether ``dataset`` is (a copy of) a set :func:`vision_dataset` made: its row-number columns are there."""
    return set(ROW_COLUMNS) <= set(getattr(dataset, "column_names", None) or ())


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
    key = uuid.uuid4().hex
    _ROW_SETS[key] = (rows, config.train_on)
    return datasets.Dataset.from_dict({"row": list(range(len(rows))), "row_set": [key] * len(rows)})


def collated(processor: Any, train: Any, evaluation: Any = None) -> tuple[Any, Any, vision.VisionCollator]:
    """The training and evaluation sets renumbered into one list of rows, and the collator over it.

    Raises:
        DataError: a set that :func:`vision_dataset` did not make, or a copy that dropped its ``row`` /
            ``row_set`` columns.
    """
    import datasets

    parts = [d for d in (train, evaluation) if d is not None]
    columns = [(d["row"], d["row_set"]) if is_vision_dataset(d) else None for d in parts]
    if not all(c is not None and set(c[1]) <= _ROW_SETS.keys() for c in columns):
        raise DataError("train: a vision-language model trains on the dataset ftengine.load_dataset(data, processor) "
                        "returns, or a copy of it that keeps its 'row' and 'row_set' columns (select, shuffle, "
                        "filter, train_test_split)")
    if len(train) == 0:
        raise DataError("train: the training set holds no rows")
    picked = [[_ROW_SETS[key][0][i] for i, key in zip(numbers, keys, strict=True)] for numbers, keys in columns]
    rows = [row for part in picked for row in part]
    n_train = len(picked[0])
    train_ds = datasets.Dataset.from_dict({"row": list(range(n_train))})
    eval_ds = (datasets.Dataset.from_dict({"row": list(range(n_train, len(rows)))}) if evaluation is not None
               else None)
    return train_ds, eval_ds, vision.VisionCollator(processor, rows, _ROW_SETS[columns[0][1][0]][1])
