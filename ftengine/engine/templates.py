"""Putting a registered chat template on a tokenizer."""

from __future__ import annotations

from typing import Any

from ftengine.core.errors import DataError
from ftengine.core.plugins import get


def _has_token(tokenizer: Any, token: str) -> bool:
    token_id = tokenizer.convert_tokens_to_ids(token)
    return token_id is not None and (token_id != tokenizer.unk_token_id or token == tokenizer.unk_token)


def apply_chat_template(tokenizer: Any, name: str) -> Any:
    """Set the registered template ``name`` on ``tokenizer`` with the BOS/EOS/pad tokens it needs.

    ``tokenizer`` keeps the tokenizer's own template (an error if it has none).

    Raises:
        DataError: the tokenizer has no template of its own, or lacks a token the template needs.
    """
    template = get("chat_templates", name)
    if template.jinja is None:
        if not getattr(tokenizer, "chat_template", None):
            raise DataError(f"chat template {name!r} means the tokenizer's own, but this tokenizer has none; "
                            f"set data.chat_template to a registered template (e.g. chatml)")
    else:
        tokenizer.chat_template = template.jinja
    for attr in ("bos_token", "eos_token", "pad_token"):
        token = getattr(template, attr)
        if token is None:
            continue
        if not _has_token(tokenizer, token):
            raise DataError(f"chat template {name!r} needs the token {token!r} as {attr}, which this tokenizer's "
                            f"vocabulary lacks; choose a template made for this model")
        setattr(tokenizer, attr, token)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer
