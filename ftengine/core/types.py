"""The interfaces plugins implement. They are Protocols: any object with these attributes will do.

The core checks the required attributes when a plugin registers an object (see
:func:`ftengine.core.plugins.REQUIRED_ATTRIBUTES`), so a plugin author gets an error naming the
missing attribute at start-up rather than deep inside a run.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from dataclasses import field
from pathlib import Path
from typing import Any
from typing import Protocol
from typing import runtime_checkable

Message = dict[str, Any]
"""One chat turn: ``{"role": "system" | "user" | "assistant" | "tool", "content": str, ...}``."""


@dataclass
class Sample:
    """What a dataset format turns one row into.

    Exactly one shape is filled:
      * ``messages``: a conversation; the assistant turns are trained (per ``data.train_on``);
      * ``prompt`` + ``completion``: only the completion is trained;
      * ``text``: raw text, every token trained (continued pretraining);
      * ``prompt`` + ``chosen`` + ``rejected``: a preference triple (DPO); each is a string or a
        message list.
    """

    messages: list[Message] | None = None
    prompt: str | list[Message] | None = None
    completion: str | None = None
    text: str | None = None
    chosen: str | list[Message] | None = None
    rejected: str | list[Message] | None = None

    @property
    def kind(self) -> str:
        if self.chosen is not None or self.rejected is not None:
            return "preference"
        if self.messages is not None:
            return "conversation"
        if self.text is not None:
            return "text"
        return "completion"


class RowError(ValueError):
    """A dataset row that a format cannot convert. ``field`` names the offending field."""

    def __init__(self, message: str, field: str | None = None):
        super().__init__(message)
        self.field = field


@runtime_checkable
class DatasetFormat(Protocol):
    """A dataset format (register_formats).

    Attributes:
        name: what ``data.format`` names.
        description: one line for ``ftengine plugins`` and error messages.
    """

    name: str
    description: str

    def detect(self, row: dict[str, Any]) -> bool:
        """True if ``row`` has this format's shape (used by ``data.format: auto``)."""

    def convert(self, row: dict[str, Any]) -> Sample:
        """Turn one row into a :class:`Sample`; raise :class:`RowError` naming the field if it cannot."""


@dataclass
class ChatTemplate:
    """A chat template (register_chat_templates).

    Attributes:
        name: what ``data.chat_template`` names (Unsloth's names: ``qwen2.5``, ``llama-3.1``, ...).
        jinja: the Jinja source, in the dialect of Hugging Face ``apply_chat_template``; ``None``
            means "the tokenizer's own" (the ``tokenizer`` template).
        bos_token / eos_token / pad_token: the special tokens the template needs set on the
            tokenizer (``None``: keep the tokenizer's).
        stop_tokens: strings that end an assistant turn (exporters put them in GGUF/Ollama metadata).
        description: one line.
    """

    name: str
    jinja: str | None
    bos_token: str | None = None
    eos_token: str | None = None
    pad_token: str | None = None
    stop_tokens: tuple[str, ...] = ()
    description: str = ""


@runtime_checkable
class ModelAdapter(Protocol):
    """Support for one architecture family (register_models).

    Attributes:
        name: the family (``llama``, ``qwen2``, ...).
        model_types: the Hugging Face ``config.model_type`` values it serves.
        default_target_modules: LoRA targets for ``target_modules: all-linear``.
        default_chat_template: a registered template name, or ``None``.
        gguf_architecture: llama.cpp's architecture name, or ``None`` when it cannot export GGUF.
    """

    name: str
    model_types: tuple[str, ...]
    default_target_modules: tuple[str, ...]
    default_chat_template: str | None
    gguf_architecture: str | None

    def patch(self, model: Any, get_op: Callable[[str], Callable[..., Any]]) -> list[str]:
        """Swap the model's module forwards for kernel ops; return a line per thing patched.

        The patched top-level forward should call :func:`ftengine.core.kernels.begin_forward` first:
        kernel backends key per-forward caches on it (e.g. LoRA weights cast to the compute dtype).
        """

    def gguf_tensor_name(self, hf_name: str) -> str | None:
        """llama.cpp's name for a Hugging Face tensor name (``None``: not exported)."""

    def gguf_tensor(self, hf_name: str, tensor: Any, config: Any) -> Any:
        """The tensor as llama.cpp expects it (e.g. Llama's q/k rows permuted to its rotary
        layout, Gemma's norm weights stored as ``1 + w``); unchanged when nothing applies."""

    def gguf_metadata(self, config: Any) -> dict[str, Any]:
        """Architecture-specific GGUF keys without the ``{arch}.`` prefix (e.g.
        ``{"attention.sliding_window": 4096}``); the exporter writes the common ones itself."""

    def gguf_extra_tensors(self, config: Any) -> dict[str, Any]:
        """Tensors llama.cpp needs that have no Hugging Face counterpart (e.g. Llama 3.1's
        ``rope_freqs.weight``), by GGUF name; ``{}`` when none."""

    # Optional (the core uses them when present):
    #   routes(model) -> list[str]: after LoRA is attached, how each projection runs (fused op or
    #       peft's path, with the reason); shown in the run summary.
    #   unpatch(model) -> int: undo patch(); the number of modules restored.


@runtime_checkable
class KernelBackend(Protocol):
    """A kernel backend (register_kernels). Its op functions are attributes named as in
    :data:`ftengine.core.kernels.OP_NAMES`; it may implement a subset.

    Attributes:
        name: ``reference``, ``triton``, ...
        priority: higher wins when several available backends implement an op.
    """

    name: str
    priority: int

    def available(self) -> bool:
        """Whether this backend can run here (device, library versions)."""


@runtime_checkable
class TrainerPlugin(Protocol):
    """A trainer (register_trainers): ``sft``, ``dpo``, ...

    Attributes:
        name: what ``training.trainer`` names.
        sample_kinds: the :attr:`Sample.kind` values it trains on.
    """

    name: str
    sample_kinds: tuple[str, ...]

    def create(self, request: "TrainRequest") -> Any:
        """Build a Hugging Face ``Trainer``-like object whose ``train(resume_from_checkpoint=...)``
        runs the training."""


@dataclass
class TrainRequest:
    """Everything a trainer plugin needs to build its trainer."""

    model: Any
    tokenizer: Any
    train_dataset: Any
    eval_dataset: Any
    training: Any
    output_dir: Path
    callbacks: list[Any] = field(default_factory=list)
    ref_model: Any = None


@runtime_checkable
class Exporter(Protocol):
    """An export format (register_exporters).

    Attributes:
        name: ``lora``, ``merged``, ``gguf``, ...
        description: one line.
        options_schema: a pydantic model of the options this exporter takes (or ``None``).
    """

    name: str
    description: str
    options_schema: Any

    def export(self, model: Any, tokenizer: Any, out_dir: Path, options: Any) -> list[str]:
        """Write the export into ``out_dir`` (an empty, temporary directory the core renames when
        this returns); return human-readable lines describing what was written."""


@dataclass
class Command:
    """An extra CLI command (register_commands): a ``click.Command`` and the plugin's name."""

    command: Any
    name: str = ""
