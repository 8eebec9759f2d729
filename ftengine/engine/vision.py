"""Vision-language runs: the processor, images in conversations, the batch collator, and generation.

A conversation's images are content parts (``{"type": "image", "image": ...}``). Training rows keep
the conversation, images opened; the collator renders each with the chat template, lets the
model's processor expand the image placeholders into image tokens and compute the pixel inputs for
the whole batch, and builds the labels: the character spans a text run would train (assistant
turns, :func:`ftengine.engine.data.conversation_spans`) mapped onto the processor's tokens by
aligning them with the tokens of the unexpanded text, so every image token (and the prompt) is -100.

Rows are encoded once in the data stage to check and count them (a row longer than
``max_seq_length`` with its image tokens is a bad row: cutting into an image would break the
model's image-token bookkeeping) and again per batch in the collator; pixels are not stored.
"""

from __future__ import annotations

import difflib
import io
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ftengine.core.errors import ConfigError
from ftengine.core.errors import DataError
from ftengine.core.errors import ModelError
from ftengine.core.types import Sample
from ftengine.engine.data import IGNORE
from ftengine.engine.data import DataReport
from ftengine.engine.data import conversation_spans
from ftengine.engine.data import encode_text

log = logging.getLogger("ftengine")


def is_vision_config(hf_config: Any) -> bool:
    """Whether a Hugging Face config describes a vision-language model (it has a ``vision_config``)."""
    return getattr(hf_config, "vision_config", None) is not None


# ----------------------------------------------------------------------------- the processor


def _tolerant(processor_class: type) -> type:
    """``processor_class`` accepting ``None`` for a sub-processor: transformers' video processors need
    torchvision, which an image-only run does not."""

    class Tolerant(processor_class):  # type: ignore[misc, valid-type]
        def check_argument_for_proper_class(self, argument_name: str, argument: Any) -> Any:
            if argument is None:
                return None
            return super().check_argument_for_proper_class(argument_name, argument)

        def save_pretrained(self, save_directory: str, **kwargs: Any) -> list[str]:
            """The tokenizer (with the processor's chat template) and the image processor: what
            :func:`load_processor` reads back."""
            if self.chat_template and not self.tokenizer.chat_template:
                self.tokenizer.chat_template = self.chat_template
            self.tokenizer.save_pretrained(save_directory)
            self.image_processor.save_pretrained(save_directory)
            return [str(save_directory)]

    Tolerant.__name__ = Tolerant.__qualname__ = processor_class.__name__
    return Tolerant


def load_processor(source: str, hf_config: Any, trust_remote_code: bool = False, revision: str | None = None,
                   max_pixels: int | None = None, min_pixels: int | None = None) -> Any:
    """The model's processor (tokenizer + image processor + chat template).

    ``AutoProcessor`` first; where it cannot build one (a video processor without torchvision), the
    processor class is assembled from the tokenizer and the PIL image processor, without video.

    Raises:
        ModelError: the directory has no processor or image processor.
    """
    from transformers import AutoImageProcessor
    from transformers import AutoProcessor
    from transformers import AutoTokenizer
    from transformers.models.auto.processing_auto import PROCESSOR_MAPPING

    kwargs: dict[str, Any] = dict(trust_remote_code=trust_remote_code, revision=revision)
    try:
        processor = AutoProcessor.from_pretrained(source, **kwargs)
    except (ImportError, AttributeError, TypeError, ValueError, OSError):
        try:
            tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
            image_processor = AutoImageProcessor.from_pretrained(source, **kwargs)
        except (OSError, ValueError) as exc:
            raise ModelError(f"{source}: cannot load the model's processor ({exc})") from None
        processor_class = _tolerant(PROCESSOR_MAPPING[type(hf_config)])
        parts = {"image_processor": image_processor, "tokenizer": tokenizer}
        attributes = {name: parts.get(name) for name in processor_class.get_attributes()}
        processor = processor_class(**attributes, chat_template=getattr(tokenizer, "chat_template", None))
    if (max_pixels or min_pixels) and not set_pixel_bounds(processor, max_pixels, min_pixels):
        log.warning("data.max_pixels / min_pixels: %s resizes images to a fixed size; the bounds are ignored",
                    type(processor.image_processor).__name__)
    return processor


def set_pixel_bounds(processor: Any, max_pixels: int | None, min_pixels: int | None) -> list[str]:
    """``data.max_pixels`` / ``min_pixels`` on an image processor with dynamic resolution (Qwen2-VL's
    ``size = {"shortest_edge": min_pixels, "longest_edge": max_pixels}``, in pixels).

    Returns:
        a summary line per bound set (none for processors with a fixed resolution).
    """
    image_processor = processor.image_processor
    size = getattr(image_processor, "size", None)
    bounds = dict(size) if isinstance(size, dict) else dict(getattr(size, "__dict__", {}))
    if bounds.get("longest_edge") is None or not hasattr(image_processor, "merge_size"):
        return []
    lines = []
    for key, value, name in (("longest_edge", max_pixels, "max_pixels"), ("shortest_edge", min_pixels, "min_pixels")):
        if value is not None:
            if isinstance(size, dict):
                size[key] = value
            else:
                setattr(size, key, value)
            lines.append(f"{name}={value}")
    return lines


# ----------------------------------------------------------------------------- which modules train / stay 16-bit


LORA_SWITCHES = ("finetune_vision_layers", "finetune_language_layers", "finetune_attention_modules",
                 "finetune_mlp_modules")


def lora_targets(spec: Any, lora: Any) -> str:
    """peft ``target_modules`` for ``all-linear`` on a vision-language model, from the ``lora.finetune_*`` switches.

    Args:
        spec: the adapter's ``vision`` layout (a :class:`~ftengine.plugins.models._vision.VisionSpec`).
        lora: the run's LoRA section.

    Raises:
        ConfigError: the switches select no module.
    """
    pattern = spec.target_modules(lora.finetune_vision_layers, lora.finetune_language_layers,
                                  lora.finetune_attention_modules, lora.finetune_mlp_modules)
    if pattern is None:
        raise ConfigError("lora.finetune_*: these switches select no module; turn on a tower "
                          "(finetune_vision_layers / finetune_language_layers) and a kind "
                          "(finetune_attention_modules / finetune_mlp_modules)")
    return pattern


def describe_targets(lora: Any) -> str:
    """The summary's words for what :func:`lora_targets` chose."""
    towers = [t for t, on in (("vision", lora.finetune_vision_layers), ("language", lora.finetune_language_layers))
              if on]
    kinds = [k for k, on in (("attention", lora.finetune_attention_modules), ("MLP", lora.finetune_mlp_modules)) if on]
    return f"the {' and '.join(kinds)} projections of the {' and '.join(towers)} tower(s)"


def keep_unquantized(bnb: Any, adapter: Any) -> list[str]:
    """With 4-/8-bit loading, leave the adapter's vision tower, projector (and what else it lists) in 16-bit
    (bitsandbytes' ``llm_int8_skip_modules``, which covers both); returns those module names."""
    spec = getattr(adapter, "vision", None)
    if bnb is None or spec is None:
        return []
    kept = list(spec.unquantized())
    bnb.llm_int8_skip_modules = kept
    return kept


# ----------------------------------------------------------------------------- images in conversations


def open_image(value: Any, base_dir: Path | None = None) -> Any:
    """An RGB PIL image from a content part's ``image``: a PIL image, a path (relative to
    ``base_dir``, the data file's directory), or a ``{"bytes": ..., "path": ...}`` dict (a datasets
    Image column read from Parquet).

    Raises:
        ValueError: the value is of another kind, the file is missing or not a readable image.
    """
    from PIL import Image

    if isinstance(value, Image.Image):
        return value.convert("RGB")
    if isinstance(value, dict) and value.get("bytes") is not None:
        source: Any = io.BytesIO(value["bytes"])
    elif isinstance(value, (dict, str, os.PathLike)):
        path = Path(value.get("path") or "" if isinstance(value, dict) else value).expanduser()
        if not path.is_absolute() and base_dir is not None:
            path = base_dir / path
        if not path.is_file():
            raise ValueError(f"image file {str(path)!r} does not exist")
        source = path
    else:
        raise ValueError(f"an image must be a path, a bytes dict or a PIL image, got {type(value).__name__}")
    try:
        with Image.open(source) as image:
            return image.convert("RGB")
    except (OSError, Image.DecompressionBombError) as exc:
        raise ValueError(f"unreadable image ({exc})") from None


def images_of(messages: list[dict[str, Any]]) -> list[Any]:
    """The images of a conversation, in order."""
    return [part["image"] for m in messages if isinstance(m.get("content"), list)
            for part in m["content"] if part.get("type") == "image"]


def has_images(sample: Sample) -> bool:
    return sample.messages is not None and bool(images_of(sample.messages))


def with_images_opened(messages: list[dict[str, Any]], base_dir: Path | None) -> list[dict[str, Any]]:
    """A copy of ``messages`` whose image parts hold opened RGB images."""
    out = []
    for m in messages:
        content = m.get("content")
        if isinstance(content, list):
            content = [{"type": "image", "image": open_image(p["image"], base_dir)} if p.get("type") == "image"
                       else dict(p) for p in content]
        out.append({**m, "content": content})
    return out


def for_template(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """``messages`` with image parts reduced to ``{"type": "image"}``: what a chat template renders."""
    return [{**m, "content": [{"type": "image"} if p.get("type") == "image" else p for p in m["content"]]}
            if isinstance(m.get("content"), list) else m for m in messages]


def _base_dir(where: str) -> Path | None:
    """The directory of the data file named in a ``"<file>: row <n>"`` location (``None`` for hub data)."""
    source = Path(where.rsplit(": row ", 1)[0])
    return source.parent if source.is_file() else None


# ----------------------------------------------------------------------------- encoding


class Renderer:
    """The processor seen as the ``tokenizer`` :func:`conversation_spans` renders with."""

    def __init__(self, processor: Any):
        self.processor = processor
        self.eos_token = getattr(processor.tokenizer, "eos_token", None)

    def apply_chat_template(self, messages: list[dict[str, Any]], **kwargs: Any) -> str:
        kwargs.pop("date_string", None)
        return self.processor.apply_chat_template(for_template(messages), **kwargs)


def _aligned_labels(short_ids: list[int], trained: list[bool], long_ids: list[int], image_ids: set[int]) -> list[int]:
    """Labels for the processor's tokens ``long_ids``: a token matched to a token of the unexpanded text
    takes its trained flag; tokens the processor inserted (image tokens, their markers) are -100."""
    labels = [IGNORE] * len(long_ids)
    matcher = difflib.SequenceMatcher(None, short_ids, long_ids, autojunk=False)
    for tag, i1, i2, j1, _ in matcher.get_opcodes():
        if tag == "equal":
            for k in range(i2 - i1):
                if trained[i1 + k] and long_ids[j1 + k] not in image_ids:
                    labels[j1 + k] = long_ids[j1 + k]
    return labels


def image_token_ids(processor: Any) -> set[int]:
    """Token ids the processor puts in place of images (never trained)."""
    ids = set()
    for attr in ("image_token_id", "boi_token_id", "eoi_token_id", "video_token_id"):
        value = getattr(processor, attr, None)
        if isinstance(value, int):
            ids.add(value)
    return ids


def encode_batch(processor: Any, conversations: list[list[dict[str, Any]]], train_on: str = "assistant",
                 add_generation_prompt: bool = False) -> dict[str, torch.Tensor]:
    """Model inputs for conversations whose image parts hold opened images, right-padded, with ``labels``.

    Args:
        processor: the model's processor.
        conversations: message lists (content a string or content parts).
        train_on: ``assistant``, ``last`` or ``all``, as in text runs.
        add_generation_prompt: render for generation (no labels then).
    """
    tokenizer = processor.tokenizer
    renderer = Renderer(processor)
    texts, encoded, images = [], [], []
    for messages in conversations:
        if add_generation_prompt:
            texts.append(renderer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True))
        else:
            text, spans = conversation_spans(renderer, messages, train_on)
            texts.append(text)
            encoded.append(encode_text(tokenizer, text, spans))
        images.append(images_of(messages))  # per conversation: Mllama's processor counts them per prompt
    side = tokenizer.padding_side
    tokenizer.padding_side = "left" if add_generation_prompt else "right"
    try:
        batch = processor(text=texts, images=images if any(images) else None, padding=True, return_tensors="pt")
    finally:
        tokenizer.padding_side = side
    batch = dict(batch)
    if add_generation_prompt:
        return batch
    special = image_token_ids(processor)
    labels = torch.full_like(batch["input_ids"], IGNORE)
    for i, enc in enumerate(encoded):
        kept = batch["attention_mask"][i].bool()
        ids = batch["input_ids"][i][kept].tolist()
        labels[i, kept] = torch.tensor(_aligned_labels(enc.input_ids, enc.trained, ids, special), dtype=torch.long)
    batch["labels"] = labels
    return batch


# ----------------------------------------------------------------------------- the data stage


@dataclass
class VisionRow:
    """One training conversation, its images opened, and where it came from."""

    messages: list[dict[str, Any]]
    where: str


def check_images_per_turn(messages: list[dict[str, Any]], limit: int | None) -> None:
    """Refuse a message with more images than the model takes in one turn (Llama 3.2 Vision: one).

    Raises:
        ValueError: naming the message, its image count and the limit.
    """
    if limit is None:
        return
    for number, message in enumerate(messages, 1):
        n = len(images_of([message]))
        if n > limit:
            raise ValueError(f"message {number} ({message.get('role')}) holds {n} images; this model takes at most "
                             f"{limit} per turn (split them across turns or rows)")


def encode_row(where: str, sample: Sample, processor: Any, max_seq_length: int, train_on: str,
               max_images_per_turn: int | None = None) -> tuple[list[dict[str, Any]], dict[str, torch.Tensor]]:
    """One row's conversation with its images opened, and its model inputs (:func:`encode_batch`).

    Raises:
        ValueError: a non-conversation sample, too many images in a turn, a missing or unreadable image, a row
            longer than ``max_seq_length`` with its image tokens, or one with nothing to train.
    """
    if sample.messages is None:
        raise ValueError(f"a {sample.kind} sample cannot train a vision-language model; use messages or "
                         "image+text rows")
    check_images_per_turn(sample.messages, max_images_per_turn)
    messages = with_images_opened(sample.messages, _base_dir(where))
    batch = encode_batch(processor, [messages], train_on)
    n = int(batch["input_ids"].shape[1])
    if n > max_seq_length:
        raise ValueError(f"{n} tokens with its image tokens, more than model.max_seq_length {max_seq_length} "
                         "(raise it, or lower data.max_pixels)")
    if not int((batch["labels"] != IGNORE).sum()):
        raise ValueError("no token to train on (no assistant turn?)")
    return messages, batch


def count_image_tokens(processor: Any, input_ids: torch.Tensor) -> int:
    """The image tokens among ``input_ids`` (one per image for Mllama, whose images enter by cross-attention)."""
    return int(sum((input_ids == t).sum() for t in image_token_ids(processor)))


def vision_rows(samples: list[tuple[str, Sample]], processor: Any, max_seq_length: int, train_on: str,
                on_bad_rows: str, report: DataReport, max_images_per_turn: int | None = None) -> list[dict[str, Any]]:
    """Conversations ready for :class:`VisionCollator`: images opened, each row encoded once to count its
    tokens, trained tokens and image tokens into ``report`` (``image_tokens`` in its extra counts).

    Raises:
        DataError: a row :func:`encode_row` refuses (naming file and row), unless ``on_bad_rows`` is skip.
    """
    rows, image_tokens, images = [], 0, 0
    for where, sample in samples:
        try:
            messages, batch = encode_row(where, sample, processor, max_seq_length, train_on, max_images_per_turn)
        except (ValueError, DataError) as exc:
            reason = f"{where}: {exc}"
            if on_bad_rows == "error":
                raise DataError(reason + "; fix the row or set data.on_bad_rows: skip") from None
            report.skip(reason, "bad image row")
            continue
        report.samples += 1
        report.tokens += int(batch["input_ids"].shape[1])
        report.trained_tokens += int((batch["labels"] != IGNORE).sum())
        image_tokens += count_image_tokens(processor, batch["input_ids"])
        images += len(images_of(messages))
        rows.append({"messages": messages})
    report.images = images
    report.image_tokens = image_tokens
    return rows


def reject_images(samples: list[tuple[str, Sample]]) -> None:
    """A text-only model gets no image rows.

    Raises:
        DataError: naming the first row with an image.
    """
    for where, sample in samples:
        if has_images(sample):
            raise DataError(f"{where}: has an image part, but the model has no vision tower; use a "
                            "vision-language model or drop the images")


class VisionCollator:
    """Batches :func:`vision_rows` rows through the processor (:func:`encode_batch`).

    The trainer's dataset holds row numbers (``{"row": i}``) into ``rows``: the conversations keep their
    opened images here, which an Arrow table cannot hold next to string contents.
    """

    def __init__(self, processor: Any, rows: list[dict[str, Any]], train_on: str = "assistant"):
        self.processor = processor
        self.rows = rows
        self.train_on = train_on

    def __call__(self, items: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        return encode_batch(self.processor, [self.rows[item["row"]]["messages"] for item in items], self.train_on)


# ----------------------------------------------------------------------------- generation


def generate_with_images(model: Any, processor: Any, messages: list[dict[str, Any]] | list[list[dict[str, Any]]],
                         max_new_tokens: int = 64, **generate_kwargs: Any) -> str | list[str]:
    """Greedy (unless ``generate_kwargs`` say otherwise) answers to conversations with images.

    Args:
        model: a vision-language model (peft-wrapped or not).
        processor: its processor.
        messages: one conversation or a list of them; image parts may hold paths, bytes dicts or PIL images.
        max_new_tokens: the longest answer.

    Returns:
        the answer text (a list for a list of conversations).
    """
    single = bool(messages) and isinstance(messages[0], dict)
    conversations = [messages] if single else messages
    opened = [with_images_opened(c, None) for c in conversations]
    batch = encode_batch(processor, opened, add_generation_prompt=True)
    device = next(model.parameters()).device
    batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
    generate_kwargs.setdefault("do_sample", False)
    tokenizer = processor.tokenizer
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = model.generate(**batch, max_new_tokens=max_new_tokens, pad_token_id=pad, **generate_kwargs)
    finally:
        model.train(was_training)
    answers = tokenizer.batch_decode(out[:, batch["input_ids"].shape[1]:], skip_special_tokens=True)
    return answers[0] if single else answers
