"""Plugin discovery through entry points, unique names, and broken-plugin isolation."""

import pytest

import ftengine
from ftengine.core import plugins
from ftengine.core.errors import PluginError
from ftengine.core.kernels import OP_NAMES
from ftengine.core.kernels import resolve_op
from ftengine.core.types import ChatTemplate


@pytest.fixture
def registries():
    regs = plugins.registries()
    added = []

    def add(obj, name):
        added.append(name)
        return regs.add_plugin(obj, name=name)

    try:
        yield add
    finally:
        for name in added:
            regs.remove_plugin(name)


def test_first_party_plugins_come_from_entry_points():
    infos = plugins.registries().plugins
    for name in ("models", "reference_kernels", "datasets", "trainers", "exporters"):
        assert infos[name].distribution == "ftengine" and infos[name].ok, infos[name]
    assert {"llama", "qwen2"} <= set(plugins.get_registry("models"))
    assert {"messages", "alpaca"} <= set(plugins.get_registry("formats"))
    assert {"chatml", "tokenizer"} <= set(plugins.get_registry("chat_templates"))
    assert "sft" in plugins.get_registry("trainers")
    assert {"lora", "merged"} <= set(plugins.get_registry("exporters"))


class TemplatePlugin:
    def __init__(self, override=False):
        self.override = override

    @ftengine.hookimpl
    def register_chat_templates(self, register):
        register(ChatTemplate(name="chatml", jinja="{{ 'x' }}"), override=self.override)


def test_duplicate_name_names_both_plugins(registries):
    info = registries(TemplatePlugin(), "dup-plugin")
    assert "'chatml' is registered by both 'datasets' and 'dup-plugin'" in info.error
    assert plugins.get_registry("chat_templates")["chatml"].jinja != "{{ 'x' }}"


def test_override_replaces_until_the_plugin_goes():
    regs = plugins.registries()
    original = plugins.get_registry("chat_templates")["chatml"]
    try:
        assert regs.add_plugin(TemplatePlugin(override=True), name="override-plugin").ok
        assert plugins.get_registry("chat_templates")["chatml"].jinja == "{{ 'x' }}"
    finally:
        regs.remove_plugin("override-plugin")
    assert plugins.get_registry("chat_templates")["chatml"] is original


class BrokenPlugin:
    @ftengine.hookimpl
    def register_formats(self, register):
        raise RuntimeError("boom")


class IncompletePlugin:
    @ftengine.hookimpl
    def register_exporters(self, register):
        register(object())


def test_broken_plugin_is_isolated(registries):
    info = registries(BrokenPlugin(), "broken-plugin")
    assert not info.ok and "register_formats failed: RuntimeError: boom" in info.error
    assert "messages" in plugins.get_registry("formats")
    info = registries(IncompletePlugin(), "incomplete-plugin")
    assert "without name, description, options_schema, export" in info.error


def test_import_failure_is_reported(monkeypatch):
    from importlib import metadata

    class FakeDist:
        name, version = "ftengine-broken", "9.9"

    class FakeEntryPoint:
        name, value, dist = "broken", "no_such_module_xyz", FakeDist()

        def load(self):
            import no_such_module_xyz  # noqa: F401

    real = metadata.entry_points
    monkeypatch.setattr(metadata, "entry_points", lambda group: [*real(group=group), FakeEntryPoint()])
    monkeypatch.setenv("FTENGINE_LOAD_PLUGINS", "ftengine,ftengine-broken")
    regs = plugins.Registries()
    regs.load_entry_points()
    regs.collect()
    assert "failed to import no_such_module_xyz: ModuleNotFoundError" in regs.plugins["broken"].error
    assert "sft" in {n for n in regs.entries["trainers"]}


def test_allowlist_loads_only_named_distributions(monkeypatch):
    monkeypatch.setenv("FTENGINE_LOAD_PLUGINS", "")
    regs = plugins.Registries()
    regs.load_entry_points()
    assert regs.plugins == {}


def test_unregistered_name_lists_choices():
    with pytest.raises(PluginError, match="no exporter named 'zip'; registered: .*lora.*merged"):
        plugins.get("exporters", "zip")


class FastBackend:
    name, priority = "fast", 50

    def __init__(self, available):
        self._available = available

    def available(self):
        return self._available

    @staticmethod
    def swiglu(gate, up):
        return "fast"


def test_op_lookup_prefers_available_backends_and_falls_back(monkeypatch):
    monkeypatch.delenv("FTENGINE_KERNELS", raising=False)
    reference = plugins.get_registry("kernels")["reference"]
    assert resolve_op("swiglu", [reference, FastBackend(True)])[0] == "fast"
    assert resolve_op("swiglu", [reference, FastBackend(False)])[0] == "reference"
    assert resolve_op("rms_norm", [reference, FastBackend(True)])[0] == "reference"
    monkeypatch.setenv("FTENGINE_KERNELS", "reference")
    assert resolve_op("swiglu", [reference, FastBackend(True)])[0] == "reference"
    for op in OP_NAMES:
        assert callable(getattr(reference, op))
