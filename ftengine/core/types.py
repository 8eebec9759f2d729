"""The interfaces plugins implement, and the data they exchange with the engine.

Each hook in :mod:`ftengine.core.hookspecs` registers objects of one Protocol below. The Protocols
are the single source of what an object needs: the registries derive their checks from them
(:func:`protocol_members`, :func:`check_protocol`), so a plugin author gets an error naming the
missing attribute when the plugin registers, not deep inside a run.

A Protocol member is **required** unless the Protocol body gives it a default value; a member
whose default is ``None`` is an **optional capability** that the engine uses when present (a
model adapter's ``gguf`` layout, its ``routes``). An optional member typed as another Protocol
(``gguf: GGUFSupport | None``) is checked against that Protocol when it is set. (The Protocols are
not ``runtime_checkable``: ``isinstance`` would demand the optional members too.)
"""

from __future__ import annotations

import functools
import inspect
import types
import typing
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from dataclasses import field
from pathlib import Path
from typing import Any
from typing import Protocol

Message = dict[str, Any]
"""One chat turn: ``{"role": "system" | "user" | "assistant" | "tool", "content": str, ...}``.

.. versionadded:: 0.1
"""


@dataclass
class Sample:
    """What a dataset format turns one row into.

    Exactly one shape is filled:
      * ``messages``: a conversation; the assistant turns are trained (per ``data.train_on``);
      * ``prompt`` + ``completion``: only the completion is trained;
      * ``text``: raw text, every token trained (continued pretraining);
      * ``prompt`` + ``chosen`` + ``rejected``: a preference triple (DPO); each is a string or a
        message list;
      * ``segments``: ``(text, trained)`` pieces joined as they are, no chat template; only the
        pieces marked trained carry loss.
      * ``prompt`` + ``completion`` + ``label``: an unpaired preference (KTO): the completion is
        desirable (``True``) or not;
      * ``prompt`` alone: a prompt to generate from (GRPO); ``columns`` holds the row's other
        fields (``answer``...), which the reward functions receive.

    .. versionadded:: 0.1
    .. versionchanged:: 0.2 ``label`` and ``columns`` (KTO and GRPO rows).
    """

    messages: list[Message] | None = None
    prompt: str | list[Message] | None = None
    completion: str | list[Message] | None = None
    text: str | None = None
    chosen: str | list[Message] | None = None
    rejected: str | list[Message] | None = None
    segments: list[tuple[str, bool]] | None = None
    label: bool | None = None
    columns: dict[str, Any] | None = None

    @property
    def kind(self) -> str:
        """``segments``, ``preference``, ``unpaired_preference``, ``prompt``, ``conversation``, ``text`` or
        ``completion``: what a trainer's ``sample_kinds`` lists."""
        if self.segments is not None:
            return "segments"
        if self.chosen is not None or self.rejected is not None:
            return "preference"
        if self.label is not None:
            return "unpaired_preference"
        if self.prompt is not None and self.completion is None:
            return "prompt"
        if self.messages is not None:
            return "conversation"
        if self.text is not None:
            return "text"
        return "completion"


class RowError(ValueError):
    """A dataset row that a format cannot convert. ``field`` names the offending field; the engine
    adds the file and the row number.

    .. versionadded:: 0.1
    """

    def __init__(self, message: str, field: str | None = None):
        super().__init__(message)
        self.field = field


class DatasetFormat(Protocol):
    """A dataset format (``register_formats``).

    Attributes:
        name: what ``data.format`` names.
        description: one line for ``ftengine plugins`` and error messages.
        to_messages: optional; the row's turns as messages without the checks training adds (a
            final assistant turn), for conversation formats. ``ftengine.standardize_sharegpt`` uses
            the ``sharegpt`` format's.

    .. versionadded:: 0.1
    """

    name: str
    description: str
    to_messages: Callable[[dict[str, Any]], list[Message]] | None = None

    def detect(self, row: dict[str, Any]) -> bool:
        """True if ``row`` has this format's shape (used by ``data.format: auto``)."""

    def convert(self, row: dict[str, Any]) -> Sample:
        """Turn one row into a :class:`Sample`; raise :class:`RowError` naming the field if it cannot."""


@dataclass
class ChatTemplate:
    """A chat template (``register_chat_templates``).

    Attributes:
        name: what ``data.chat_template`` names (Unsloth's names: ``qwen2.5``, ``llama-3.1``, ...).
        jinja: the Jinja source, in the dialect of Hugging Face ``apply_chat_template``; ``None``
            means "the tokenizer's own" (the ``tokenizer`` template).
        bos_token / eos_token / pad_token: the special tokens the template needs set on the
            tokenizer (``None``: keep the tokenizer's).
        stop_tokens: strings that end an assistant turn (exporters put them in GGUF/Ollama metadata).
        description: one line.

    .. versionadded:: 0.1
    """

    name: str
    jinja: str | None
    bos_token: str | None = None
    eos_token: str | None = None
    pad_token: str | None = None
    stop_tokens: tuple[str, ...] = ()
    description: str = ""


class GGUFSupport(Protocol):
    """How one architecture is written to GGUF for llama.cpp (a model adapter's optional ``gguf``).

    Attributes:
        architecture: llama.cpp's architecture name (``llama``, ``qwen2``, ``gemma2``, ...).
        split_tensor: optional; ``split_tensor(hf_name, tensor) -> [(hf_name, tensor), ...]``: one
            merged Hugging Face tensor as the tensors llama.cpp keeps apart (a mixture-of-experts
            model's fused ``experts.gate_up_proj`` as gate and up stacks), before the name mapping.
        mmproj: optional; a vision-language family's vision tower and projector as llama.cpp's
            ``mmproj`` file (an :class:`ftengine.plugin.MmprojLayout`); the ``gguf`` exporter refuses
            a vision-language model whose family has none.

    .. versionadded:: 0.1
    """

    architecture: str
    split_tensor: Callable[[str, Any], list[tuple[str, Any]]] | None = None
    mmproj: Any | None = None

    def tensor_name(self, hf_name: str) -> str | None:
        """llama.cpp's name for a Hugging Face tensor name (``None``: not exported)."""

    def tensor(self, hf_name: str, tensor: Any, config: Any) -> Any:
        """The tensor as llama.cpp expects it (e.g. Llama's q/k rows permuted to its rotary
        layout, Gemma's norm weights stored as ``1 + w``); unchanged when nothing applies."""

    def metadata(self, config: Any) -> dict[str, Any]:
        """Architecture-specific GGUF keys without the ``{arch}.`` prefix (e.g.
        ``{"attention.sliding_window": 4096}``); the exporter writes the common ones itself."""

    def extra_tensors(self, config: Any) -> dict[str, Any]:
        """Tensors llama.cpp needs that have no Hugging Face counterpart (e.g. Llama 3.1's
        ``rope_freqs.weight``), by GGUF name; ``{}`` when none."""


class ModelAdapter(Protocol):
    """Support for one architecture family (``register_models``).

    Attributes:
        name: the family (``llama``, ``qwen2``, ...).
        model_types: the Hugging Face ``config.model_type`` values it serves.
        default_target_modules: LoRA targets for ``target_modules: all-linear``.
        default_chat_template: a registered template name, or ``None``.
        gguf: optional; a :class:`GGUFSupport` when the family can be exported to GGUF.
        routes: optional; ``routes(model) -> list[str]``: after LoRA is attached, how each
            projection runs (fused op or peft's path, with the reason), shown in the run summary.
        unpatch: optional; ``unpatch(model) -> int``: undo :meth:`patch`, returning the number of
            modules restored.
        quantized_load: optional; ``quantized_load(get_op)`` returns a context manager the engine enters
            around a ``load_in_4bit`` ``from_pretrained``, for weights bitsandbytes leaves 16-bit that the
            family stores 4-bit itself (fused 3-D expert weights, quantized as they arrive so they are never
            whole in 16 bits on the GPU).

    :class:`ftengine.plugin.DecoderAdapter` builds one from data (the classes to patch, the GGUF
    layout) for decoder-only families.

    .. versionadded:: 0.1
    """

    name: str
    model_types: tuple[str, ...]
    default_target_modules: tuple[str, ...]
    default_chat_template: str | None
    gguf: GGUFSupport | None = None
    routes: Callable[[Any], list[str]] | None = None
    unpatch: Callable[[Any], int] | None = None
    quantized_load: Callable[[Callable[[str], Callable[..., Any]]], AbstractContextManager[None]] | None = None

    def patch(self, model: Any, get_op: Callable[[str], Callable[..., Any]]) -> list[str]:
        """Swap the model's module forwards for kernel ops; return a line per thing patched.

        The patched top-level forward should call :func:`ftengine.core.kernels.begin_forward` first:
        kernel backends key per-forward caches on it (e.g. LoRA weights cast to the compute dtype).
        """


class KernelBackend(Protocol):
    """A kernel backend (``register_kernels``). Its op functions are attributes named as in
    :data:`ftengine.core.kernels.OP_NAMES`, with the signatures documented there; it may
    implement a subset and the engine falls back op by op to the ``reference`` backend.

    Attributes:
        name: ``reference``, ``triton``, ...
        priority: higher wins when several available backends implement an op.

    .. versionadded:: 0.1
    """

    name: str
    priority: int

    def available(self) -> bool:
        """Whether this backend can run here (device, library versions)."""


@dataclass
class TrainRequest:
    """Everything a trainer plugin needs to build its trainer.

    Attributes:
        model: the patched (and, for LoRA, peft-wrapped) model.
        tokenizer: its tokenizer, chat template set.
        train_dataset / eval_dataset: tokenized rows (``input_ids``, ``labels``, ... per the trainer's
            sample kinds); ``eval_dataset`` may be ``None``.
        training: the validated ``training`` section (:class:`ftengine.core.config.TrainingConfig`).
        output_dir: where checkpoints go.
        callbacks: the engine's progress, metrics, checkpoint and interruption callbacks; pass them on.
        ref_model: a frozen reference model for trainers that need one and cannot use the
            adapter-disabled policy (full fine-tuning), else ``None``.
        max_seq_length: the longest row in tokens (``model.max_seq_length``).
        attn_implementation: the attention implementation the model was loaded with.
        trainer_arguments: extra ``transformers.TrainingArguments`` keywords the engine sets (the
            multi-process strategy: ``ddp_*``, ``fsdp``, ``fsdp_config``); pass them on as they are.
        options: the trainer's ``training.trainer_options``, validated: an instance of its
            ``options_schema`` (``None`` for a trainer without one).
        data_collator: batches the rows when the engine prepared them for it (conversations with
            images); ``None``: the trainer's own collator.
        route_generate: for trainers that sample from the model: ``route_generate(model, backend)``
            makes ``model.generate`` sample through the engine's decoder (a preallocated KV cache,
            each token's step replayed from a CUDA graph on a GPU) where it serves the call, for
            ``backend`` ``auto`` or ``static`` (``transformers`` leaves ``generate`` as it is), and
            returns the run log's line on it; it raises ``ConfigError`` for ``static`` on a model the
            decoder cannot serve. ``None``: ``generate`` stays transformers'.

    .. versionadded:: 0.1
    """

    model: Any
    tokenizer: Any
    train_dataset: Any
    eval_dataset: Any
    training: Any
    output_dir: Path
    callbacks: list[Any] = field(default_factory=list)
    ref_model: Any = None
    max_seq_length: int = 2048
    attn_implementation: str = "sdpa"
    trainer_arguments: dict[str, Any] = field(default_factory=dict)
    options: Any = None
    data_collator: Any = None
    route_generate: Callable[[Any, str], str] | None = None


class TrainerPlugin(Protocol):
    """A trainer (``register_trainers``): ``sft``, ``dpo``, ...

    Attributes:
        name: what ``training.trainer`` names.
        sample_kinds: the :attr:`Sample.kind` values it trains on.
        options_schema: a pydantic model of its ``training.trainer_options`` (``None``: it takes
            none); the core validates the config against it and hands the instance to
            :meth:`create` as ``request.options``.

    .. versionadded:: 0.1
    .. versionchanged:: 0.2 ``options_schema``.
    """

    name: str
    sample_kinds: tuple[str, ...]
    options_schema: Any = None

    def create(self, request: TrainRequest) -> Any:
        """Build a Hugging Face ``Trainer``-like object whose ``train(resume_from_checkpoint=...)``
        runs the training."""


class Exporter(Protocol):
    """An export format (``register_exporters``).

    Attributes:
        name: ``lora``, ``merged``, ``gguf``, ...
        description: one line.
        options_schema: a pydantic model of the options this exporter takes (or ``None``); the
            ``export:`` entry of the config is validated against it before the run starts.
        check: optional; ``check(options, config, hf_config) -> [problem, ...]``: what would make this
            export fail for this run, found before the model loads (an architecture the format cannot
            write, a training setting the format cannot carry), from the validated ``options``, the
            :class:`~ftengine.core.config.RunConfig` and the model's Hugging Face config (no weights).
            Each problem is one line naming the option or setting; the run does not start.

    .. versionadded:: 0.1
    .. versionchanged:: 0.2
       ``check``.
    """

    name: str
    description: str
    options_schema: Any
    check: Callable[[Any, Any, Any], list[str]] | None = None

    def export(self, model: Any, tokenizer: Any, out_dir: Path, options: Any) -> list[str]:
        """Write the export into ``out_dir`` (an empty, temporary directory the engine renames when
        this returns); return human-readable lines describing what was written."""


@dataclass
class Reward:
    """A reward function (``register_rewards``) for the trainers that score generations (``grpo``).

    Attributes:
        name: what ``training.trainer_options.reward_funcs`` names.
        function: ``function(completions, **columns) -> list[float | None]``: ``completions`` is the
            list of generated texts, ``prompts`` the prompts they answer, and every other column of
            the dataset row comes as a keyword list aligned with them (``answer=[...]``). ``None``
            means "does not apply to this completion"; NaN is refused.
        description: one line.

    .. versionadded:: 0.2
    """

    name: str
    function: Callable[..., list[float | None]]
    description: str = ""


class Command(Protocol):
    """An extra CLI command (``register_commands``): a ``click.Command`` satisfies it.

    Attributes:
        name: the command's name; it may not shadow a core command.
        callback: the function click calls.

    .. versionadded:: 0.1
    """

    name: str
    callback: Callable[..., Any] | None


@functools.cache
def protocol_members(protocol: type) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """``(required, optional)`` member names of a Protocol, from its body alone.

    Annotated attributes and methods are members; a member with a default value in the body is optional.
    """
    body = vars(protocol)
    annotated = tuple(protocol.__dict__.get("__annotations__", {}))
    methods = tuple(n for n, v in body.items() if inspect.isfunction(v) and not n.startswith("_"))
    required = tuple(n for n in annotated if n not in body) + methods
    optional = tuple(n for n in annotated if n in body)
    return required, optional


def _nested_protocol(protocol: type, member: str) -> type | None:
    """The Protocol an optional member is typed as (``gguf: GGUFSupport | None`` -> GGUFSupport)."""
    hint = typing.get_type_hints(protocol).get(member)
    for arg in typing.get_args(hint) if isinstance(hint, types.UnionType) or typing.get_origin(hint) else (hint,):
        if isinstance(arg, type) and getattr(arg, "_is_protocol", False):
            return arg
    return None


def check_protocol(obj: Any, protocol: type) -> list[str]:
    """What ``obj`` lacks to be a ``protocol``: required members missing, and the missing members
    of an optional capability that is set (``gguf.tensor_name``). Empty when it conforms."""
    required, optional = protocol_members(protocol)
    problems = [name for name in required if not hasattr(obj, name)]
    for name in optional:
        value = getattr(obj, name, None)
        nested = _nested_protocol(protocol, name) if value is not None else None
        if nested is not None:
            problems += [f"{name}.{missing}" for missing in check_protocol(value, nested)]
    return problems
