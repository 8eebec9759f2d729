"""Pydantic's validation errors as the one-line messages users read: the key path, what was expected,
and a did-you-mean for a near miss."""

from __future__ import annotations

import difflib
import re
from typing import Any

from pydantic import BaseModel

from ftengine.core.errors import ConfigError

_TYPE_WORDS = {
    "int": "an integer", "float": "a number", "bool": "true or false", "string": "a string",
    "dict": "a mapping", "list": "a list", "literal": "one of", "finite": "a finite number",
}


def _model_at(root: type[BaseModel], loc: tuple[Any, ...]) -> type[BaseModel] | None:
    """The schema class of the section under ``root`` that holds the key at ``loc`` (None inside free-form
    values)."""
    model = root
    for part in loc[:-1]:
        if isinstance(part, int):
            continue
        field = model.model_fields.get(part)
        if field is None:
            return None
        annotation = field.annotation
        args = getattr(annotation, "__args__", ())
        candidates = [annotation, *args]
        nested = [c for c in candidates if isinstance(c, type) and issubclass(c, BaseModel)]
        if not nested:
            return None
        model = nested[0]
    return model


def key_path(loc: tuple[Any, ...]) -> str:
    """``("export", 0, "quantization")`` -> ``export[0].quantization``; a key that is empty or holds characters
    that do not print (a line break) is quoted, ``data.columns['\\r']``, so a message stays one line a problem."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif isinstance(part, str) and (not part or not part.isprintable()):
            out += f"[{part!r}]"
        else:
            out += f".{part}" if out else str(part)
    return out


_TYPE_TAGS = ("bool", "int", "float", "str", "list", "dict", "none", "literal", "function")


def _clean_loc(loc: tuple[Any, ...]) -> tuple[Any, ...]:
    """Drop pydantic's union-branch tags (``bool``, ``literal['offload','auto']``) from a location."""
    return tuple(p for p in loc if not (isinstance(p, str) and (p.split("[")[0].split("-")[0] in _TYPE_TAGS)
                                        and p not in ("dict",)))


def _expected(err: dict[str, Any]) -> str:
    kind = err["type"]
    if kind == "literal_error":
        return err["ctx"]["expected"]
    if kind == "value_error":
        return str(err["ctx"]["error"])
    bounds = {"greater_than": ">", "greater_than_equal": ">=", "less_than": "<", "less_than_equal": "<="}
    if kind in bounds:
        return f"a value {bounds[kind]} {next(iter(err['ctx'].values()))}"
    return next((word for key, word in _TYPE_WORDS.items() if kind.startswith(key)), err["msg"])


def format_errors(errors: list[dict[str, Any]], root: type[BaseModel] | None = None,
                  fields: list[str] | None = None) -> list[str]:
    """One line per key: unknown keys with a suggestion, missing keys, and wrong values with what
    was expected (the branches of a union merged into one line). The valid keys offered for an unknown
    one are ``fields`` (an exporter's options), else those of its section in the ``root`` schema."""
    by_path: dict[tuple[Any, ...], list[dict[str, Any]]] = {}
    for err in errors:
        by_path.setdefault(_clean_loc(err["loc"]), []).append(err)
    lines = []
    for loc, errs in by_path.items():
        path = key_path(loc)
        kind = errs[0]["type"]
        if kind == "extra_forbidden":
            model = _model_at(root, loc) if root is not None else None
            known = fields if fields is not None else (list(model.model_fields) if model else [])
            parent = key_path(loc[:-1])
            close = difflib.get_close_matches(str(loc[-1]), known, n=1, cutoff=0.6)
            prefix = f"{parent}." if parent else ""
            if close:
                lines.append(f"{path}: unknown key; did you mean {prefix}{close[0]}?")
            else:
                lines.append(f"{path}: unknown key; expected one of: {', '.join(prefix + k for k in known)}")
        elif kind == "missing":
            lines.append(f"{path}: required key is missing")
        else:
            value = errs[0].get("input")
            expected = " or ".join(dict.fromkeys(_expected(e) for e in errs))
            lines.append(f"{path}: expected {expected}, got {value!r} ({type(value).__name__}){_suggest(value, errs)}")
    return lines


def _suggest(value: Any, errs: list[dict[str, Any]]) -> str:
    """``; did you mean 'x'?`` when a string is close to one of the allowed strings (``flex-attention``)."""
    if not isinstance(value, str):
        return ""
    choices = [c for e in errs if e["type"] == "literal_error" for c in re.findall(r"'([^']*)'", e["ctx"]["expected"])]
    close = difflib.get_close_matches(value, choices, n=1, cutoff=0.6)
    return f"; did you mean {close[0]!r}?" if close else ""


def problems_error(source: str, lines: list[str]) -> ConfigError:
    """One error listing every problem of ``source``, one per line."""
    return ConfigError(f"{source}: {len(lines)} problem(s):\n  " + "\n  ".join(lines))
