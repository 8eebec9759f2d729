"""Every hook a plugin can implement: the plugin author's reference.

A plugin is a module (or object) with functions decorated ``@ftengine.plugin.hookimpl``, declared in
its distribution's ``pyproject.toml`` under the entry-point group ``ftengine``::

    [project.entry-points.ftengine]
    my_plugin = "my_package.plugin"

Every hook has the shape ``register_<things>(register)``: call ``register(obj)`` once per thing
you supply. The object must satisfy the interface named in the hook's signature (the Protocols in
:mod:`ftengine.core.types`); the check runs when you register, and a missing attribute is an error
naming it. ``register(obj, override=True)`` replaces a first-party (or any earlier) thing of the
same name; without it, a taken name is an error naming both plugins. A plugin whose import or
registration fails is shown as broken by ``ftengine plugins``; the others keep working.

Hooks are called once, when the registries are first built (at the start of a run or of a CLI
command), in plugin load order. Hook signatures only ever gain arguments; an implementation may
accept a subset of them.
"""

from __future__ import annotations

from typing import Protocol
from typing import TypeVar

import pluggy

from ftengine.core.types import ChatTemplate
from ftengine.core.types import Command
from ftengine.core.types import DatasetFormat
from ftengine.core.types import Exporter
from ftengine.core.types import KernelBackend
from ftengine.core.types import ModelAdapter
from ftengine.core.types import Reward
from ftengine.core.types import TrainerPlugin

hookspec = pluggy.HookspecMarker("ftengine")
hookimpl = pluggy.HookimplMarker("ftengine")
"""The decorator of a plugin's hook implementations.

.. versionadded:: 0.1
"""

T = TypeVar("T", contravariant=True)


class Register(Protocol[T]):
    """The ``register`` callable a hook receives.

    .. versionadded:: 0.1
    """

    def __call__(self, obj: T, override: bool = False) -> None:
        """Register ``obj``; ``override=True`` replaces an earlier registration of the same name."""


RegisterModel = Register[ModelAdapter]
RegisterKernel = Register[KernelBackend]
RegisterFormat = Register[DatasetFormat]
RegisterChatTemplate = Register[ChatTemplate]
RegisterTrainer = Register[TrainerPlugin]
RegisterExporter = Register[Exporter]
RegisterCommand = Register[Command]
RegisterReward = Register[Reward]


@hookspec
def register_models(register: RegisterModel) -> None:
    """Register architecture support: one :class:`~ftengine.core.types.ModelAdapter` per family.

    The adapter names the Hugging Face ``model_type`` values it serves, its default LoRA targets
    and chat template, and ``patch(model, get_op)``, which swaps module forwards for kernel ops
    (``get_op("rms_norm")`` and the other ops of :mod:`ftengine.core.kernels`). Optional: a
    ``gguf`` layout (:class:`~ftengine.core.types.GGUFSupport`) so the ``gguf`` exporter can write
    the family, ``routes(model)`` for the run summary and ``unpatch(model)``. For a decoder-only
    family, :class:`ftengine.plugin.DecoderAdapter` builds all of it from data.

    Example::

        @hookimpl
        def register_models(register):
            register(DecoderAdapter(
                name="myarch", model_types=("myarch",), default_chat_template="chatml",
                table=PatchTable(norms=("MyRMSNorm",), attentions=("MyAttention",), mlps=("MyMLP",),
                                 causal_lms=("MyForCausalLM",)),
                gguf=GGUFLayout(architecture="llama", permute_qk=True)))

    .. versionadded:: 0.1
    """


@hookspec
def register_kernels(register: RegisterKernel) -> None:
    """Register a kernel backend: a :class:`~ftengine.core.types.KernelBackend`.

    The backend has ``name``, ``priority`` (higher wins), ``available() -> bool`` and, as
    attributes, any subset of the ops in :data:`ftengine.core.kernels.OP_NAMES` with exactly the
    signatures documented there. The engine takes each op from the best available backend that
    has it and falls back op by op to the ``reference`` backend; ``FTENGINE_KERNELS=<name>`` pins
    one backend.

    Example::

        class MyBackend:
            name, priority = "mine", 20

            def available(self):
                return torch.cuda.is_available()

            def rms_norm(self, x, weight, eps, offset=0.0):
                ...

        @hookimpl
        def register_kernels(register):
            register(MyBackend())

    .. versionadded:: 0.1
    """


@hookspec
def register_formats(register: RegisterFormat) -> None:
    """Register dataset formats: one :class:`~ftengine.core.types.DatasetFormat` each.

    A format has ``name``, ``description``, ``detect(row) -> bool`` (used by ``data.format:
    auto``, which requires exactly one format to claim a file's rows) and ``convert(row) ->
    Sample``; raise :class:`~ftengine.core.types.RowError` with the field name when a row is
    malformed (the engine adds the file and row number).

    Example::

        class QAFormat:
            name, description = "qa", "question/answer pairs"

            def detect(self, row):
                return "question" in row and "answer" in row

            def convert(self, row):
                return Sample(messages=[{"role": "user", "content": row["question"]},
                                        {"role": "assistant", "content": row["answer"]}])

        @hookimpl
        def register_formats(register):
            register(QAFormat())

    .. versionadded:: 0.1
    """


@hookspec
def register_chat_templates(register: RegisterChatTemplate) -> None:
    """Register chat templates: one :class:`~ftengine.core.types.ChatTemplate` each.

    A template has ``name``, ``jinja`` (Hugging Face ``apply_chat_template`` dialect; ``None``
    means the tokenizer's own), the ``bos_token`` / ``eos_token`` / ``pad_token`` it needs and its
    ``stop_tokens``. Training masks are computed from rendered text offsets, so a template needs no
    special markers.

    Example::

        @hookimpl
        def register_chat_templates(register):
            register(ChatTemplate(name="mytemplate", jinja=SOURCE, eos_token="<|end|>",
                                  stop_tokens=("<|end|>",)))

    .. versionadded:: 0.1
    """


@hookspec
def register_trainers(register: RegisterTrainer) -> None:
    """Register trainers: one :class:`~ftengine.core.types.TrainerPlugin` each (``sft``, ``dpo``...).

    A trainer has ``name``, ``sample_kinds`` (which :class:`~ftengine.core.types.Sample` kinds it
    trains on), optionally ``options_schema`` (a pydantic model of its own options) and
    ``create(request)``, which receives a :class:`~ftengine.core.types.TrainRequest` and returns a
    Hugging Face ``Trainer``-like object. The engine validates ``training.trainer_options`` (or the
    extra keyword arguments of ``ftengine.train``) against ``options_schema`` before the run starts,
    reporting unknown keys and bad values with their key path, and hands the instance over as
    ``request.options``; ``ftengine config-schema`` lists every trainer's schema. The engine puts its
    progress, metrics, checkpoint and interruption callbacks in ``request.callbacks``: pass them on
    to the trainer.

    Example::

        class MyOptions(pydantic.BaseModel):
            model_config = pydantic.ConfigDict(extra="forbid")
            alpha: float = 0.5

        class MyTrainer:
            name, sample_kinds, options_schema = "mysft", ("conversation",), MyOptions

            def create(self, request):
                alpha = request.options.alpha
                return transformers.Trainer(model=request.model, train_dataset=request.train_dataset,
                                            callbacks=request.callbacks, ...)

        @hookimpl
        def register_trainers(register):
            register(MyTrainer())

    .. versionadded:: 0.1
    """


@hookspec
def register_exporters(register: RegisterExporter) -> None:
    """Register export formats: one :class:`~ftengine.core.types.Exporter` each.

    An exporter has ``name``, ``description``, ``options_schema`` (a pydantic model or ``None``;
    the ``export:`` entry of the config is validated against it before the run starts) and
    ``export(model, tokenizer, out_dir, options) -> list[str]``. ``out_dir`` is a fresh temporary
    directory that the engine renames into place only when ``export`` returns, so an interrupted
    export never looks finished. :func:`ftengine.plugin.iter_merged_tensors` yields a LoRA model's
    weights with the adapters merged, one tensor at a time.

    Example::

        class NpzExporter:
            name, description, options_schema = "npz", "NumPy archive of the merged weights", None

            def export(self, model, tokenizer, out_dir, options):
                arrays = {n: t.numpy() for n, t in iter_merged_tensors(model, torch.float32)}
                numpy.savez(out_dir / "model.npz", **arrays)
                return [f"{len(arrays)} tensors"]

        @hookimpl
        def register_exporters(register):
            register(NpzExporter())

    .. versionadded:: 0.1
    """


@hookspec
def register_rewards(register: RegisterReward) -> None:
    """Register reward functions for the trainers that score generated completions (``grpo``): one
    :class:`~ftengine.core.types.Reward` each.

    A reward has ``name`` (what ``training.trainer_options.reward_funcs`` lists) and
    ``function(completions, **columns) -> list[float | None]``: one score per completion text; the
    prompts come as ``prompts`` and each other dataset column (``answer``...) as a list aligned with
    the completions. A function that raises is reported with its name and the dataset row; NaN
    scores are refused.

    Example::

        def polite(completions, **columns):
            return [float("please" in text) for text in completions]

        @hookimpl
        def register_rewards(register):
            register(Reward(name="polite", function=polite))

    .. versionadded:: 0.2
    """


@hookspec
def register_commands(register: RegisterCommand) -> None:
    """Register extra ``ftengine`` CLI commands: ``register(click_command)``.

    Commands are loaded lazily and cannot shadow a core command (``run``, ``init``, ``plugins``,
    ...): such a registration is an error.

    Example::

        @hookimpl
        def register_commands(register):
            @click.command(name="hello")
            def hello():
                click.echo("hello")
            register(hello)

    .. versionadded:: 0.1
    """


HOOKS = (register_models, register_kernels, register_formats, register_chat_templates, register_trainers,
         register_exporters, register_rewards, register_commands)
"""Every hook, in the order the reference lists them."""


def reference() -> str:
    """The hooks as Markdown: each hook's signature, the first paragraph of its docstring and the
    members the registered object needs (from its Protocol in :mod:`ftengine.core.types`).

    README.md's "Writing plugins" section holds this text between ``<!-- hooks:begin -->`` and
    ``<!-- hooks:end -->`` (a test keeps the two equal).
    """
    import inspect
    import re
    import typing

    from ftengine.core import types

    def plain(text: str) -> str:
        text = re.sub(r":\w+:`~?(?:[\w.]+\.)?([\w]+)`", r"`\1`", text)
        return text.replace("``", "`").replace("\n", " ")

    parts = []
    for hook in HOOKS:
        register = typing.get_type_hints(hook)["register"]
        protocol = typing.get_args(register)[0]
        required, optional = types.protocol_members(protocol)
        members = f"The object needs {', '.join(f'`{m}`' for m in required)}"
        if optional:
            members += f"; optional {', '.join(f'`{m}`' for m in optional)}"
        signature = f"{hook.__name__}{inspect.signature(hook)}".replace("'", "")
        parts.append(f"- `{signature}`: {plain(inspect.getdoc(hook).split(chr(10) * 2)[0])} {members}.")
    return "\n".join(parts)
