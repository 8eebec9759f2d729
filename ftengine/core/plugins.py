"""Plugin discovery and the registries.

Plugins are found through the entry-point group ``ftengine`` (first-party plugins included: the
core imports none of them). ``FTENGINE_LOAD_PLUGINS=a,b`` limits loading to those distributions
(``""`` loads none); ``FTENGINE_TRACE_PLUGINS=1`` prints every hook call.

Each plugin's ``register_*`` implementations are called one by one with a ``register`` callable
bound to that plugin, so a taken name is reported with both plugins' names and a plugin whose
registration raises is recorded as broken while the others keep working.
"""

from __future__ import annotations

import importlib
import os
import sys
from dataclasses import dataclass
from dataclasses import field
from importlib import metadata
from typing import Any

import pluggy

from ftengine.core import hookspecs
from ftengine.core import types
from ftengine.core.errors import PluginError

GROUP = "ftengine"

KINDS: dict[str, tuple[str, type]] = {
    "models": ("register_models", types.ModelAdapter),
    "kernels": ("register_kernels", types.KernelBackend),
    "formats": ("register_formats", types.DatasetFormat),
    "chat_templates": ("register_chat_templates", types.ChatTemplate),
    "trainers": ("register_trainers", types.TrainerPlugin),
    "exporters": ("register_exporters", types.Exporter),
    "rewards": ("register_rewards", types.Reward),
    "commands": ("register_commands", types.Command),
}
"""Each kind of registered thing: the hook that registers it and the interface it must have."""


@dataclass
class PluginInfo:
    """What ``ftengine plugins`` shows for one plugin."""

    name: str
    distribution: str
    version: str
    module: str
    registered: dict[str, list[str]] = field(default_factory=dict)
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


@dataclass
class Entry:
    obj: Any
    plugin: str
    replaced: Entry | None = None  # what an override replaced; back in place if the plugin goes


class Registries:
    """The plugin manager and one name -> object registry per kind."""

    def __init__(self) -> None:
        self.pm = pluggy.PluginManager(GROUP)
        self.pm.add_hookspecs(hookspecs)
        self.plugins: dict[str, PluginInfo] = {}
        self.entries: dict[str, dict[str, Entry]] = {kind: {} for kind in KINDS}
        if os.environ.get("FTENGINE_TRACE_PLUGINS"):
            self.pm.add_hookcall_monitoring(_trace_before, _trace_after)

    def load_entry_points(self) -> None:
        allow = os.environ.get("FTENGINE_LOAD_PLUGINS")
        allowed = None if allow is None else {a.strip() for a in allow.split(",") if a.strip()}
        for ep in metadata.entry_points(group=GROUP):
            dist = ep.dist.name if ep.dist is not None else "?"
            if allowed is not None and dist not in allowed:
                continue
            version = ep.dist.version if ep.dist is not None else "?"
            info = PluginInfo(name=ep.name, distribution=dist, version=version, module=ep.value)
            if ep.name in self.plugins:
                info.error = f"plugin name {ep.name!r} is already taken by {self.plugins[ep.name].distribution}"
                self.plugins[f"{dist}:{ep.name}"] = info
                continue
            self.plugins[ep.name] = info
            try:
                module = ep.load()
                self.pm.register(module, name=ep.name)
            except Exception as exc:  # a broken plugin must not take the others down
                info.error = f"failed to import {ep.value}: {type(exc).__name__}: {exc}"
        self.pm.check_pending()

    def add_plugin(self, obj: Any, name: str, distribution: str = "(registered in code)") -> PluginInfo:
        """Register a plugin object directly (tests, notebooks) and collect what it registers."""
        info = PluginInfo(name=name, distribution=distribution, version="", module=repr(obj))
        self.plugins[name] = info
        self.pm.register(obj, name=name)
        self._collect(only=name)
        return info

    def remove_plugin(self, name: str) -> None:
        plugin = self.pm.get_plugin(name)
        if plugin is not None:
            self.pm.unregister(plugin)
        self.plugins.pop(name, None)
        for registry in self.entries.values():
            for key in [k for k, e in registry.items() if e.plugin == name]:
                replaced = registry.pop(key).replaced
                if replaced is not None:
                    registry[key] = replaced

    def collect(self) -> None:
        self._collect(only=None)

    def _collect(self, only: str | None) -> None:
        for kind, (hook_name, _) in KINDS.items():
            hook = getattr(self.pm.hook, hook_name)
            # pluggy lists implementations last-registered first; register in load order.
            for impl in reversed(hook.get_hookimpls()):
                if only is not None and impl.plugin_name != only:
                    continue
                info = self.plugins.get(impl.plugin_name)
                if info is None or info.error:
                    continue
                try:
                    impl.function(register=self._register_fn(kind, impl.plugin_name))
                except Exception as exc:
                    info.error = f"{hook_name} failed: {type(exc).__name__}: {exc}"

    def _register_fn(self, kind: str, plugin: str):
        def register(obj: Any, override: bool = False) -> None:
            missing = types.check_protocol(obj, KINDS[kind][1])
            if missing:
                raise PluginError(f"plugin {plugin!r} registered a {kind[:-1]} {obj!r} without {', '.join(missing)}")
            name = obj.name
            taken = self.entries[kind].get(name)
            if taken is not None and not override:
                raise PluginError(
                    f"{kind[:-1]} name {name!r} is registered by both {taken.plugin!r} and {plugin!r}; "
                    f"the later one must pass override=True to replace it"
                )
            self.entries[kind][name] = Entry(obj, plugin, replaced=taken)
            self.plugins[plugin].registered.setdefault(kind, []).append(name)

        return register


def _trace_before(hook_name: str, hook_impls: list, kwargs: dict) -> None:
    print(f"[ftengine] {hook_name} -> {[i.plugin_name for i in hook_impls]}", file=sys.stderr)


def _trace_after(outcome, hook_name: str, hook_impls: list, kwargs: dict) -> None:
    print(f"[ftengine] {hook_name} done", file=sys.stderr)


_REGISTRIES: Registries | None = None


def registries() -> Registries:
    """The process-wide registries, built on first use."""
    global _REGISTRIES
    if _REGISTRIES is None:
        regs = Registries()
        regs.load_entry_points()
        regs.collect()
        _REGISTRIES = regs
    return _REGISTRIES


def reset_registries() -> None:
    """Forget the registries so the next use rediscovers the plugins (tests, ``FTENGINE_LOAD_PLUGINS`` changes)."""
    global _REGISTRIES
    _REGISTRIES = None
    importlib.invalidate_caches()


def get_registry(kind: str) -> dict[str, Any]:
    """``{name: object}`` of one kind (``models``, ``kernels``, ``formats``, ``chat_templates``,
    ``trainers``, ``exporters``, ``rewards``, ``commands``)."""
    return {name: entry.obj for name, entry in registries().entries[kind].items()}


def get(kind: str, name: str) -> Any:
    """One registered object; a :class:`PluginError` listing the registered names otherwise."""
    registry = get_registry(kind)
    if name not in registry:
        choices = ", ".join(sorted(registry)) or "(none registered)"
        raise PluginError(f"no {kind[:-1].replace('_', ' ')} named {name!r}; registered: {choices}")
    return registry[name]


def adapter_for_model_type(model_type: str) -> Any | None:
    """The model adapter serving a Hugging Face ``model_type``, or ``None``."""
    for adapter in get_registry("models").values():
        if model_type in adapter.model_types:
            return adapter
    return None
