"""``unsloth.chat_templates``' names: :func:`get_chat_template`, :func:`standardize_sharegpt`,
:func:`standardize_data_formats`, :func:`to_sharegpt` and :func:`train_on_responses_only`, over ftengine's
Python API."""

from __future__ import annotations

from typing import Any

import ftengine
from ftengine.compat._arguments import strict
from ftengine.compat.trainers import retrain_on_responses
from ftengine.core.errors import ConfigError
from ftengine.core.plugins import get_registry

ALIASES = {
    "llama": "llama-2", "llama2": "llama-2", "llama3": "llama-3", "llama-31": "llama-3.1", "llama31": "llama-3.1",
    "llama-32": "llama-3.2", "llama32": "llama-3.2", "llama-33": "llama-3.3", "llama33": "llama-3.3",
    "qwen-2.5": "qwen2.5", "qwen-25": "qwen2.5", "qwen25": "qwen2.5", "gemma2": "gemma-2", "gemma3": "gemma-3",
    "mixtral": "mistral", "phi3": "phi-3", "phi-35": "phi-3.5", "phi35": "phi-3.5", "phi4": "phi-4",
}
"""Unsloth's spellings of template names -> the registered names."""
ROLE_KEYS = ("role", "content", "user", "assistant", "system")


def template_name(chat_template: str) -> str:
    """The registered template Unsloth's name ``chat_template`` means.

    Raises:
        ConfigError: a name neither registered nor an alias, with the names that are.
    """
    registered = get_registry("chat_templates")
    name = chat_template if chat_template in registered else ALIASES.get(chat_template.lower(), chat_template)
    if name not in registered:
        known = sorted({*registered, *(a for a, n in ALIASES.items() if n in registered)})
        raise ConfigError(f"get_chat_template: no chat template {chat_template!r}; known: {', '.join(known)}")
    return name


def _mapped(jinja: str, mapping: dict[str, str]) -> str:
    """``jinja`` reading messages whose keys and role names are ``mapping``'s (ShareGPT's ``from``/``value``,
    ``human``/``gpt``): a prologue rewrites them as role/content messages first; role/content messages
    pass unchanged."""
    unknown = set(mapping) - set(ROLE_KEYS)
    if unknown:
        raise ConfigError(f"get_chat_template: mapping keys must be among {', '.join(ROLE_KEYS)}, got "
                          f"{', '.join(sorted(unknown))}")
    role_key, content_key = mapping.get("role", "role"), mapping.get("content", "content")
    roles = {mapping.get(r, r): r for r in ("user", "assistant", "system")}
    prologue = (
        "{%- set ftengine_roles = " + repr(roles) + " -%}"
        "{%- set ftengine_ns = namespace(turns=[]) -%}"
        "{%- for m in messages -%}"
        "{%- if " + repr(role_key) + " in m -%}"
        "{%- set r = m[" + repr(role_key) + "] -%}"
        "{%- set ftengine_ns.turns = ftengine_ns.turns + [{'role': ftengine_roles.get(r, r), "
        "'content': m[" + repr(content_key) + "]}] -%}"
        "{%- else -%}{%- set ftengine_ns.turns = ftengine_ns.turns + [m] -%}{%- endif -%}"
        "{%- endfor -%}"
        "{%- set messages = ftengine_ns.turns -%}"
    )
    return prologue + jinja


@strict
def get_chat_template(tokenizer: Any, chat_template: str | tuple[str, str] = "chatml",
                      mapping: dict[str, str] | None = None, map_eos_token: bool = True) -> Any:
    """Put a chat template on ``tokenizer``, by Unsloth's name (``llama3``, ``qwen25``, ``gemma3``, ...) or as
    a ``(jinja, eos_token)`` pair.

    Args:
        mapping: the message keys and role names the data uses, e.g. ``{"role": "from", "content": "value",
            "user": "human", "assistant": "gpt"}`` for ShareGPT rows.
        map_eos_token: make the template's end-of-turn token the tokenizer's EOS (so generation stops at
            the end of a turn); ``False`` keeps the tokenizer's own EOS.
    """
    eos = tokenizer.eos_token
    if isinstance(chat_template, tuple):
        jinja, turn_end = chat_template
        tokenizer.chat_template = jinja
        if map_eos_token:
            tokenizer.eos_token = turn_end
    else:
        tokenizer = ftengine.get_chat_template(tokenizer, template_name(chat_template))
        if not map_eos_token and eos is not None:
            tokenizer.eos_token = eos
    if mapping:
        tokenizer.chat_template = _mapped(tokenizer.chat_template, mapping)
    return tokenizer


@strict
def standardize_sharegpt(dataset: Any) -> Any:
    """ShareGPT ``from``/``value`` turns rewritten as ``role``/``content`` in the same ``conversations`` column."""
    return ftengine.standardize_sharegpt(dataset, column="conversations")


def _renamed_roles(turns: Any, roles: dict[str, str]) -> Any:
    """The turns with each alias (``from`` or ``role``) replaced by its role; anything else as it was."""
    if not isinstance(turns, list):
        return turns
    out = []
    for turn in turns:
        key = "from" if isinstance(turn, dict) and "from" in turn else "role"
        speaker = turn.get(key) if isinstance(turn, dict) else None
        mapped = roles.get(speaker.lower()) if isinstance(speaker, str) else None
        out.append({**turn, key: mapped} if mapped else turn)
    return out


@strict
def standardize_data_formats(dataset: Any, tokenizer: Any = None,
                             aliases_for_system: tuple[str, ...] | list[str] = ("system",),
                             aliases_for_user: tuple[str, ...] | list[str] = ("user", "human", "input"),
                             aliases_for_assistant: tuple[str, ...] | list[str] = ("gpt", "assistant", "output"),
                             ) -> Any:
    """Conversations in whatever turn keys and speaker names (``from``/``value`` or ``role``/``content``;
    the aliases named here, then ShareGPT's own) rewritten as ``role``/``content`` turns, in the column they
    came in (``conversations``, else ``messages``). ``tokenizer`` is taken for compatibility.

    Raises:
        ConfigError: the rows have neither a ``conversations`` nor a ``messages`` column.
        RowError: a turn that is not a conversation turn, named by row and turn.
    """
    first = dataset[0] if len(dataset) else {}
    column = next((c for c in ("conversations", "messages") if c in first), None)
    if column is None:
        raise ConfigError(f"standardize_data_formats: the rows need a 'conversations' or 'messages' column, got "
                          f"{', '.join(map(str, first)) or 'no rows'}")
    roles = {**{a.lower(): "system" for a in aliases_for_system}, **{a.lower(): "user" for a in aliases_for_user},
             **{a.lower(): "assistant" for a in aliases_for_assistant}}
    if isinstance(dataset, list):
        renamed = [{**row, column: _renamed_roles(row.get(column), roles)} for row in dataset]
    else:
        renamed = dataset.map(lambda row: {column: _renamed_roles(row[column], roles)})
    return ftengine.standardize_sharegpt(renamed, column=column)


@strict
def to_sharegpt(dataset: Any, merged_prompt: str = "{instruction}", merged_column_name: str = "instruction",
                output_column_name: str = "output", remove_unused_columns: bool = True,
                conversation_extension: int = 1, random_state: int = 3407) -> Any:
    """:func:`ftengine.to_sharegpt`; the rows keep only ``conversations`` (the merged prompt needs no
    intermediate column, so ``merged_column_name`` and ``remove_unused_columns`` change nothing)."""
    return ftengine.to_sharegpt(dataset, merged_prompt, output_column_name, conversation_extension, random_state)


@strict
def train_on_responses_only(trainer: Any, instruction_part: str | None = None, response_part: str | None = None,
                            force_match: bool = True, tokenizer: Any = None, num_proc: int | None = None) -> Any:
    """Train only on the responses: in each text the trainer was built with, the parts after
    ``response_part`` up to the next ``instruction_part`` carry loss; everything else is masked.

    The texts become ftengine ``segments`` rows (marked spans, tokenized once), so the masking is exact
    at token boundaries. Rows with no response are dropped. The parts match the text exactly, so
    ``force_match``, ``tokenizer`` and ``num_proc`` are taken for compatibility and change nothing.

    Raises:
        ConfigError: a part missing, or a trainer not built through ``ftengine.compat``.
    """
    if not instruction_part or not response_part:
        raise ConfigError("train_on_responses_only: give instruction_part and response_part (the text that "
                          "starts a user turn and an assistant turn in the chat template)")
    return retrain_on_responses(trainer, instruction_part, response_part)
