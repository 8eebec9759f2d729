"""Every hook a plugin can implement. Each docstring is the plugin author's documentation.

A plugin is a module (or object) with functions decorated ``@ftengine.hookimpl``, declared in
its distribution's ``pyproject.toml`` under the entry-point group ``ftengine``::

    [project.entry-points.ftengine]
    my_plugin = "my_package.plugin"

Every hook has the shape ``register_<things>(register)``: call ``register(obj)`` once per thing
you supply. ``register(obj, override=True)`` replaces a first-party (or any earlier) thing of the
same name; without it, a taken name is an error naming both plugins.
"""

from __future__ import annotations

import pluggy

hookspec = pluggy.HookspecMarker("ftengine")
hookimpl = pluggy.HookimplMarker("ftengine")


@hookspec
def register_models(register):
    """Register architecture support: one :class:`ftengine.core.types.ModelAdapter` per family.

    Called once, when the registries are first built (at start-up of a run or a CLI command).

    :param register: ``register(adapter, override=False)``. The adapter needs ``name``,
        ``model_types`` (Hugging Face ``config.model_type`` values), ``default_target_modules``,
        ``default_chat_template``, ``gguf_architecture``, ``patch(model, get_op) -> list[str]``
        and ``gguf_tensor_name(hf_name) -> str | None``.

    Example::

        @ftengine.hookimpl
        def register_models(register):
            register(MyArchAdapter(name="myarch", model_types=("myarch",), ...))

    .. versionadded:: 0.1
    """


@hookspec
def register_kernels(register):
    """Register a kernel backend: a :class:`ftengine.core.types.KernelBackend`.

    The backend has ``name``, ``priority`` (higher wins), ``available() -> bool`` and, as
    attributes, any subset of the ops in :data:`ftengine.core.kernels.OP_NAMES` with exactly the
    signatures documented there. Ops a backend lacks fall back to the ``reference`` backend.

    :param register: ``register(backend, override=False)``.

    Example::

        @ftengine.hookimpl
        def register_kernels(register):
            register(MyBackend())  # name="mine", priority=20, available() checks the device

    .. versionadded:: 0.1
    """


@hookspec
def register_formats(register):
    """Register dataset formats: one :class:`ftengine.core.types.DatasetFormat` each.

    A format has ``name``, ``description``, ``detect(row) -> bool`` (used by ``data.format:
    auto``) and ``convert(row) -> Sample`` (raise :class:`ftengine.core.types.RowError` with the
    field name when a row is malformed; the core adds the file and row number).

    :param register: ``register(fmt, override=False)``.

    Example::

        @ftengine.hookimpl
        def register_formats(register):
            register(QAFormat())  # detect: "question" in row; convert: Sample(messages=[...])

    .. versionadded:: 0.1
    """


@hookspec
def register_chat_templates(register):
    """Register chat templates: one :class:`ftengine.core.types.ChatTemplate` each.

    A template has ``name``, ``jinja`` (Hugging Face ``apply_chat_template`` dialect; ``None``
    means the tokenizer's own), the ``bos_token`` / ``eos_token`` / ``pad_token`` it needs and its
    ``stop_tokens``. Training masks are computed from rendered text offsets, so a template needs no
    special markers.

    :param register: ``register(template, override=False)``.

    Example::

        @ftengine.hookimpl
        def register_chat_templates(register):
            register(ChatTemplate(name="mytemplate", jinja=SOURCE, eos_token="<|end|>"))

    .. versionadded:: 0.1
    """


@hookspec
def register_trainers(register):
    """Register trainers: one :class:`ftengine.core.types.TrainerPlugin` each (``sft``, ``dpo``...).

    A trainer has ``name``, ``sample_kinds`` (which :class:`~ftengine.core.types.Sample` kinds it
    trains on) and ``create(request: TrainRequest)`` returning a Hugging Face ``Trainer``-like
    object. The core adds its progress, metrics, checkpoint and interruption callbacks to
    ``request.callbacks``; pass them on to the trainer.

    :param register: ``register(trainer, override=False)``.

    .. versionadded:: 0.1
    """


@hookspec
def register_exporters(register):
    """Register export formats: one :class:`ftengine.core.types.Exporter` each.

    An exporter has ``name``, ``description``, ``options_schema`` (a pydantic model or ``None``;
    the core validates the ``export:`` entry against it) and
    ``export(model, tokenizer, out_dir, options) -> list[str]``. ``out_dir`` is a fresh temporary
    directory that the core renames into place only when ``export`` returns, so an interrupted
    export never looks finished.

    :param register: ``register(exporter, override=False)``.

    .. versionadded:: 0.1
    """


@hookspec
def register_commands(register):
    """Register extra ``ftengine`` CLI commands: ``register(click_command)``.

    Commands are loaded lazily and cannot shadow a core command (``run``, ``init``, ``plugins``,
    ...): such a registration is an error.

    :param register: ``register(command, override=False)``.

    Example::

        @ftengine.hookimpl
        def register_commands(register):
            @click.command(name="hello")
            def hello():
                click.echo("hello")
            register(hello)

    .. versionadded:: 0.1
    """
