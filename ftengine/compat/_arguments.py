"""Unknown keyword arguments of the compat functions: one error naming each, with a did-you-mean."""

from __future__ import annotations

import difflib
import functools
import inspect
from collections.abc import Callable
from typing import Any
from typing import TypeVar

from ftengine.core.errors import ConfigError

F = TypeVar("F", bound=Callable[..., Any])


def unknown_arguments(where: str, given: dict[str, Any], known: list[str]) -> None:
    """Raise a :class:`ConfigError` listing the keys of ``given`` (all unknown), each with the closest
    known name or the list of known names."""
    if not given:
        return
    lines = []
    for name in given:
        close = difflib.get_close_matches(name, known, n=1, cutoff=0.6)
        lines.append(f"{name}: unknown argument; " + (f"did you mean {close[0]}?" if close
                                                      else f"expected one of: {', '.join(known)}"))
    raise ConfigError(f"{where}: " + "; ".join(lines))


def strict(function: F) -> F:
    """Calling ``function`` with a keyword it does not take is a did-you-mean :class:`ConfigError`
    (Python's own ``TypeError`` names no alternative)."""
    parameters = inspect.signature(function).parameters
    known = [name for name, p in parameters.items()
             if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and name not in ("self", "cls")]
    where = function.__qualname__

    @functools.wraps(function)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        unknown_arguments(where, {k: v for k, v in kwargs.items() if k not in known}, known)
        return function(*args, **kwargs)

    return wrapper  # type: ignore[return-value]
