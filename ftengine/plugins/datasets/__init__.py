"""Dataset formats (alpaca, sharegpt, messages, text, completion, preference) and chat templates.

One plugin, registered through the ``ftengine`` entry point ``datasets``.
"""

from __future__ import annotations

from collections.abc import Callable

from ftengine.core.hookspecs import hookimpl
from ftengine.plugins.datasets.formats import FORMATS
from ftengine.plugins.datasets.templates import TEMPLATES

__all__ = ["register_chat_templates", "register_formats"]


@hookimpl
def register_formats(register: Callable[..., None]) -> None:
    """Register every built-in dataset format."""
    for fmt in FORMATS:
        register(fmt)


@hookimpl
def register_chat_templates(register: Callable[..., None]) -> None:
    """Register every built-in chat template."""
    for template in TEMPLATES:
        register(template)
