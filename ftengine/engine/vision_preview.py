"""``ftengine data preview`` for a vision-language model: rows encoded by the model's processor.

Each shown row prints its rendered conversation with one placeholder per image (its size and the image
tokens the processor expands it to); the statistics count the images and image tokens of the whole
dataset. Rows a run would refuse (a missing image, more images in a turn than the model takes, too long
with its image tokens) are counted as skipped with their reason, as ``data.on_bad_rows: skip`` would.
"""

from __future__ import annotations

from typing import Any

import torch

from ftengine.core.config import RunConfig
from ftengine.engine import vision
from ftengine.engine.data import IGNORE
from ftengine.engine.data import DataReport
from ftengine.engine.data import conversation_spans
from ftengine.engine.data import encode_text
from ftengine.engine.data import load_samples


def image_marker(processor: Any) -> str:
    """The text the chat template writes for one image (Gemma 3's ``<start_of_image>``, Qwen's image pad
    inside its vision markers, Llama 3.2 Vision's ``<|image|>``)."""
    return getattr(processor, "boi_token", None) or processor.image_token


def tokens_per_image(processor: Any, input_ids: torch.Tensor, images: int) -> list[int] | None:
    """The image tokens of each image of one row: the runs of image tokens in ``input_ids``, in order;
    ``None`` when the runs do not pair with the images (two images side by side)."""
    special = vision.image_token_ids(processor)
    runs, previous = [], False
    for token in input_ids.tolist():
        inside = token in special
        if inside and not previous:
            runs.append(0)
        if inside:
            runs[-1] += 1
        previous = inside
    return runs if len(runs) == images else None


def describe_images(processor: Any, messages: list[dict[str, Any]], input_ids: torch.Tensor) -> list[str]:
    """One placeholder per image of an encoded row: ``<image 1: 160x50, 12 tokens>``."""
    opened = vision.images_of(messages)
    counts = tokens_per_image(processor, input_ids, len(opened))
    placeholders = []
    for i, image in enumerate(opened, 1):
        tokens = "" if counts is None else f", {counts[i - 1]} token" + ("" if counts[i - 1] == 1 else "s")
        placeholders.append(f"<image {i}: {image.width}x{image.height}{tokens}>")
    return placeholders


def build_vision_preview(config: RunConfig, processor: Any, n: int, max_images_per_turn: int | None,
                         preview: Any) -> Any:
    """Fill ``preview`` (an empty :class:`~ftengine.engine.preview.Preview`) with the rows of
    ``config.data.path`` as a vision run encodes them; keep the first ``n``."""
    from ftengine.engine.preview import Shown

    d, max_len = config.data, config.model.max_seq_length
    report: DataReport = preview.report
    samples = load_samples(d.path, d.model_copy(update={"on_bad_rows": "skip"}), report)
    preview.converted, preview.packing = len(samples), False
    renderer = vision.Renderer(processor)
    for where, sample in samples:
        try:
            messages, batch = vision.encode_row(where, sample, processor, max_len, d.train_on, max_images_per_turn)
        except ValueError as exc:
            report.skip(f"{where}: {exc}", "bad image row")
            continue
        n_tokens = int(batch["input_ids"].shape[1])
        report.samples += 1
        report.tokens += n_tokens
        report.trained_tokens += int((batch["labels"] != IGNORE).sum())
        report.images += len(vision.images_of(messages))
        report.image_tokens += vision.count_image_tokens(processor, batch["input_ids"])
        preview.lengths.append(n_tokens)
        if len(preview.shown) < n:
            text, spans = conversation_spans(renderer, messages, d.train_on)
            images = describe_images(processor, messages, batch["input_ids"][0])
            preview.shown.append(Shown(where, [("", encode_text(processor.tokenizer, text, spans))], images,
                                       n_tokens))
    return preview


def with_placeholders(text: str, marker: str, images: list[str]) -> str:
    """``text`` with its k-th image ``marker`` replaced by the k-th placeholder."""
    parts = text.split(marker)
    if len(parts) != len(images) + 1:
        return text
    return parts[0] + "".join(image + rest for image, rest in zip(images, parts[1:], strict=True))
