"""trl's ``SFTTrainer`` and ``DPOTrainer`` (``GRPOTrainer``, ``KTOTrainer``, ``ORPOTrainer``: :mod:`.rl_trainers`)
called the notebook way (``tokenizer=``, ``max_seq_length=``, ``dataset_text_field=``, ``TrainingArguments``)
become the trainers :func:`ftengine.make_trainer` builds:
the model's fused-loss forward, ftengine's checkpointing (as ``get_peft_model`` set it; the trainer does
not switch it on again), its precision for the model's dtype and its padding collator.

Importing :mod:`ftengine.compat` puts these classes in ``trl``'s namespace (``from trl import SFTTrainer``
then gets them); the classes in ``trl.trainer.sft_trainer`` / ``dpo_trainer`` stay as they are.
"""

from __future__ import annotations

import math
import weakref
from typing import Any

import trl
from trl.trainer.dpo_trainer import DPOTrainer as TrlDPOTrainer
from trl.trainer.sft_trainer import SFTTrainer as TrlSFTTrainer

import ftengine
from ftengine.compat._arguments import strict
from ftengine.core.errors import ConfigError
from ftengine.core.types import Sample
from ftengine.engine import vision
from ftengine.engine import vision_api
from ftengine.engine.data import sample_text_and_spans
from ftengine.engine.settings import settings_of

TRAINING_KEYS = ("per_device_train_batch_size", "gradient_accumulation_steps", "learning_rate", "max_steps",
                 "num_train_epochs", "lr_scheduler_type", "weight_decay", "optim", "max_grad_norm", "seed",
                 "logging_steps", "save_total_limit")
"""TrainingArguments fields copied as they are into ftengine's ``training:`` keys."""

_TEXTS: weakref.WeakKeyDictionary[Any, tuple[list[str], int]] = weakref.WeakKeyDictionary()
"""The texts (and max_seq_length) each compat SFT trainer was built from, for train_on_responses_only."""


def training_keys(args: Any) -> dict[str, Any]:
    """ftengine ``training:`` keys from a ``TrainingArguments`` / ``SFTConfig`` / ``DPOConfig``."""
    if args is None:
        return {}
    values = {}
    for key in TRAINING_KEYS:
        value = getattr(args, key)
        values[key] = getattr(value, "value", value)  # enums (scheduler, optimizer) by name
    warmup = args.warmup_steps or 0
    if 0 < warmup < 1:  # a ratio of the run
        if args.max_steps <= 0:
            raise ConfigError("TrainingArguments: a warmup ratio needs max_steps; give warmup_steps as a count")
        warmup = math.ceil(warmup * args.max_steps)
    values["warmup_steps"] = int(warmup)
    if args.save_strategy != "no" and isinstance(args.save_steps, int) and args.save_steps > 0:
        values["save_steps"] = args.save_steps
    if args.eval_strategy != "no" and args.eval_steps:
        values["eval_steps"] = int(args.eval_steps)
    return values


def notebook_tokenizer(tokenizer: Any, processing_class: Any, trainer: str) -> Any:
    """The tokenizer a notebook passed, as ``tokenizer=`` (older trl) or ``processing_class=``.

    Raises:
        ConfigError: neither was given.
    """
    chosen = tokenizer if tokenizer is not None else processing_class
    if chosen is None:
        raise ConfigError(f"{trainer}: pass tokenizer= (or processing_class=)")
    return chosen


def _rows(dataset: Any) -> list[dict[str, Any]]:
    return dataset.to_list() if hasattr(dataset, "to_list") else list(dataset)


def _texts(dataset: Any, text_field: str, formatting_func: Any) -> list[str] | None:
    """The training texts, when the rows are texts (or a formatting function makes them); ``None`` for
    structured rows (messages, ShareGPT, ...), which ftengine formats itself."""
    if dataset is None:
        return None
    columns = getattr(dataset, "column_names", None) or list(_rows(dataset)[0])
    if formatting_func is not None:
        return [formatting_func(row) for row in _rows(dataset)]
    if "input_ids" in columns or text_field not in columns:
        return None
    return [row[text_field] for row in _rows(dataset)]


class UnslothVisionDataCollator:
    """Unsloth's collator for image conversations (``{"messages": [...]}`` rows whose image parts hold PIL
    images, paths or bytes). Handed to ``SFTTrainer(data_collator=...)`` it makes the trainer read the rows
    with :func:`ftengine.load_dataset` and the processor (each row checked, images counted) and batch them
    with ftengine's vision collator; called itself it batches rows the same way.

    As Unsloth's, it trains every text token (image tokens and padding masked); with
    ``train_on_responses_only`` only the assistant turns, found from the chat template. ``instruction_part``
    and ``response_part``, where given, are checked against that template (each must open the user /
    assistant turns it renders), so that a pair naming other spans is refused rather than silently
    trained differently.
    """

    @strict
    def __init__(self, model: Any, processor: Any, max_seq_length: int | None = None,
                 train_on_responses_only: bool = False, instruction_part: str | None = None,
                 response_part: str | None = None) -> None:
        if not vision_api.is_processor(processor):
            raise ConfigError("UnslothVisionDataCollator: pass the processor FastVisionModel.from_pretrained "
                              f"returned, got {type(processor).__name__}")
        self.processor = processor
        self.max_seq_length = max_seq_length or settings_of(model).max_seq_length
        self.train_on = "assistant" if train_on_responses_only else "all"
        if train_on_responses_only:
            _check_turn_markers(processor, instruction_part, response_part)

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, Any]:
        conversations = [vision.with_images_opened(row["messages"], None) for row in rows]
        return vision.encode_batch(self.processor, conversations, self.train_on)


def _check_turn_markers(processor: Any, instruction_part: str | None, response_part: str | None) -> None:
    """Raises:
        ConfigError: a given ``instruction_part`` / ``response_part`` does not come right before the user /
            assistant text in the processor's chat template."""
    user, answer = "ftengine-user-text", "ftengine-assistant-text"
    rendered = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "text", "text": user}]},
         {"role": "assistant", "content": [{"type": "text", "text": answer}]}], tokenize=False)
    for name, part, text, role in (("instruction_part", instruction_part, user, "user"),
                                   ("response_part", response_part, answer, "assistant")):
        before = rendered[:rendered.find(text)]
        if part is not None and not before.rstrip().endswith(part.rstrip()):
            raise ConfigError(f"UnslothVisionDataCollator: {name} {part!r} does not open the {role} turns of this "
                              f"processor's chat template (its {role} text follows {before[-40:]!r}); ftengine "
                              "trains the assistant turns the template marks: leave it out or pass the template's")


def _vision_sft(model: Any, args: Any, collator: UnslothVisionDataCollator, train_dataset: Any,
                eval_dataset: Any, callbacks: list[Any] | None, max_length: int | None) -> Any:
    max_length = max_length or collator.max_seq_length
    datasets = [None if d is None else ftengine.load_dataset(d, collator.processor, max_seq_length=max_length,
                                                             train_on=collator.train_on)
                for d in (train_dataset, eval_dataset)]
    return ftengine.make_trainer(model, collator.processor, datasets[0], "sft", eval_dataset=datasets[1],
                                 output_dir=getattr(args, "output_dir", None) or "outputs", callbacks=callbacks,
                                 max_seq_length=max_length, **training_keys(args))


@strict
def _sft(model: Any, args: Any = None, data_collator: Any = None, train_dataset: Any = None, eval_dataset: Any = None,
         processing_class: Any = None, tokenizer: Any = None, callbacks: list[Any] | None = None,
         formatting_func: Any = None, dataset_text_field: str | None = None, max_seq_length: int | None = None,
         packing: bool | None = None, dataset_num_proc: int | None = None) -> Any:
    if isinstance(data_collator, UnslothVisionDataCollator):
        return _vision_sft(model, args, data_collator, train_dataset, eval_dataset, callbacks,
                           max_seq_length or getattr(args, "max_length", None))
    tokenizer = notebook_tokenizer(tokenizer, processing_class, "SFTTrainer")
    text_field = dataset_text_field or getattr(args, "dataset_text_field", None) or "text"
    max_length = max_seq_length or getattr(args, "max_length", None) or settings_of(model).max_seq_length
    packing = bool(packing if packing is not None else getattr(args, "packing", False))
    datasets = []
    texts = None
    for i, dataset in enumerate((train_dataset, eval_dataset)):
        found = _texts(dataset, text_field, formatting_func)
        if i == 0:
            texts = found
        if dataset is None:
            datasets.append(None)
        elif found is not None:
            datasets.append(ftengine.load_dataset([{"text": t} for t in found], tokenizer, format="text",
                                                  max_seq_length=max_length, packing=packing))
        elif "input_ids" in (getattr(dataset, "column_names", None) or ()):
            datasets.append(dataset)
        else:
            datasets.append(ftengine.load_dataset(dataset, tokenizer, max_seq_length=max_length, packing=packing))
    trainer = ftengine.make_trainer(model, tokenizer, datasets[0], "sft", eval_dataset=datasets[1],
                                    output_dir=getattr(args, "output_dir", None) or "outputs", callbacks=callbacks,
                                    max_seq_length=max_length, **training_keys(args))
    if texts is not None:
        _TEXTS[trainer] = (texts, max_length)
    return trainer


@strict
def _dpo(model: Any, ref_model: Any = None, args: Any = None, data_collator: Any = None, train_dataset: Any = None,
         eval_dataset: Any = None, processing_class: Any = None, tokenizer: Any = None,
         callbacks: list[Any] | None = None, beta: float | None = None, max_length: int | None = None,
         max_prompt_length: int | None = None, loss_type: str | None = None) -> Any:
    tokenizer = notebook_tokenizer(tokenizer, processing_class, "DPOTrainer")
    max_length = max_length or getattr(args, "max_length", None) or settings_of(model).max_seq_length
    keys = training_keys(args)
    keys["beta"] = beta if beta is not None else getattr(args, "beta", 0.1)
    arg_loss = getattr(args, "loss_type", None)
    keys["loss_type"] = loss_type or (arg_loss[0] if isinstance(arg_loss, list) else arg_loss) or "sigmoid"
    return ftengine.make_trainer(model, tokenizer, train_dataset, "dpo", eval_dataset=eval_dataset,
                                 output_dir=getattr(args, "output_dir", None) or "outputs", callbacks=callbacks,
                                 ref_model=ref_model, max_seq_length=max_length, **keys)


class SFTTrainer(TrlSFTTrainer):
    """Called as trl's ``SFTTrainer`` (notebook arguments included); returns the trainer ftengine builds
    (trl's SFTTrainer taking the loss from the model's fused forward). ``data_collator`` and
    ``dataset_num_proc`` are replaced by ftengine's, and so are the ``fp16``/``bf16`` flags (the
    model's dtype decides)."""

    def __new__(cls, *args: Any, **kwargs: Any) -> Any:
        return _sft(*args, **kwargs)


class DPOTrainer(TrlDPOTrainer):
    """Called as trl's ``DPOTrainer`` (``tokenizer=``, ``beta=``, ``max_length=``); returns the trainer
    ftengine's ``dpo`` trainer builds (the adapter disabled as the reference for LoRA).
    ``max_prompt_length`` is taken and dropped, as trl itself dropped it."""

    def __new__(cls, *args: Any, **kwargs: Any) -> Any:
        return _dpo(*args, **kwargs)


def install() -> None:
    """Put the compat trainers in ``trl``'s namespace (idempotent)."""
    from ftengine.compat.rl_trainers import GRPOTrainer
    from ftengine.compat.rl_trainers import KTOTrainer
    from ftengine.compat.rl_trainers import ORPOConfig
    from ftengine.compat.rl_trainers import ORPOTrainer

    for module in (trl, getattr(trl, "trainer", None)):
        if module is not None:
            module.SFTTrainer = SFTTrainer
            module.DPOTrainer = DPOTrainer
            module.GRPOTrainer = GRPOTrainer
            module.KTOTrainer = KTOTrainer
            module.ORPOTrainer = ORPOTrainer
            module.ORPOConfig = ORPOConfig


def segments(text: str, instruction_part: str, response_part: str) -> list[dict[str, Any]]:
    """``text`` as segments: after each ``response_part`` up to the next ``instruction_part`` trained."""
    out, position = [], 0
    while True:
        start = text.find(response_part, position)
        if start < 0:
            break
        start += len(response_part)
        end = text.find(instruction_part, start)
        end = len(text) if end < 0 else end
        out += [{"text": text[position:start], "label": False}, {"text": text[start:end], "label": True}]
        position = end
    if position < len(text):
        out.append({"text": text[position:], "label": False})
    return [s for s in out if s["text"]]


def retrain_on_responses(trainer: Any, instruction_part: str, response_part: str) -> Any:
    """Replace ``trainer``'s training rows by the response-only ``segments`` rows of its texts."""
    if trainer not in _TEXTS:
        raise ConfigError("train_on_responses_only: the trainer was not built from texts through ftengine.compat's "
                          "SFTTrainer (import ftengine.compat before trl; pass dataset_text_field rows)")
    texts, max_length = _TEXTS[trainer]
    tokenizer = trainer.processing_class
    # each text as the trainer trains it (the tokenizer's BOS first, the EOS last), then split into spans
    framed = [sample_text_and_spans(Sample(text=t), tokenizer, "all")[0] for t in texts]
    rows = [{"segments": segments(t, instruction_part, response_part)} for t in framed]
    trainer.train_dataset = ftengine.load_dataset(rows, trainer.processing_class, format="segments",
                                                  max_seq_length=max_length, on_bad_rows="skip")
    if len(trainer.train_dataset) == 0:
        raise ConfigError(f"train_on_responses_only: no text contains response_part {response_part!r}")
    return trainer
