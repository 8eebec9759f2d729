"""Dataset formats (alpaca, sharegpt, messages, text, completion, preference) and chat templates.

One plugin, registered through the ``ftengine`` entry point ``datasets``. The data helpers
:func:`standardize_sharegpt` and :func:`conversation_extension` (from :mod:`.helpers`) are
importable from here too.
"""

from __future__ import annotations

from collections.abc import Callable

from ftengine.core.hookspecs import hookimpl
from ftengine.plugins.datasets.formats import FORMATS
from ftengine.plugins.datasets.helpers import conversation_extension
from ftengine.plugins.datasets.helpers import standardize_sharegpt
from ftengine.plugins.datasets.templates import TEMPLATES

__all__ = ["conversation_extension", "register_chat_templates", "register_formats", "standardize_sharegpt"]


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
