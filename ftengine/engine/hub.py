"""Uploading an export directory to the Hugging Face Hub (``create_repo`` + ``upload_folder``), with a
model card, and the checks that let a bad push fail before any training."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ftengine.core.config import HUB_REPO_ID as REPO_ID
from ftengine.core.errors import ConfigError


def resolve_token(token: str | None) -> str | None:
    """``token``, else ``HF_TOKEN`` / the token ``huggingface-cli login`` saved (huggingface_hub's lookup)."""
    if token:
        return token
    from huggingface_hub import get_token

    return get_token()


def check_push(repo_id: Any, token: str | None, where: str) -> str:
    """The token a push to ``repo_id`` will use.

    Raises:
        ConfigError: ``repo_id`` is not ``owner/name``, or no token is given, set or saved.
    """
    if not isinstance(repo_id, str) or not REPO_ID.match(repo_id) or ".." in repo_id:
        raise ConfigError(f"{where}: push_to_hub must be a Hub repository id 'owner/name' (letters, digits, '-', "
                          f"'_', '.'), got {repo_id!r}")
    resolved = resolve_token(token)
    if not resolved:
        raise ConfigError(f"{where}: pushing to {repo_id} needs a Hugging Face token with write access: set HF_TOKEN, "
                          f"run `hf auth login`, or pass token")
    return resolved


def model_card(repo_id: str, base_model: str | None, export_format: str, details: dict[str, Any]) -> str:
    """A README.md with the Hub's metadata header (base model, library, tags) and what the run did."""
    header = ["---"]
    if base_model:
        header.append(f"base_model: {base_model}")
    header += ["library_name: " + ("peft" if export_format == "lora" else "transformers"), "tags:", "- ftengine",
               f"- {export_format}", "---", ""]
    body = [f"# {repo_id.split('/')[-1]}", "",
            f"Fine-tuned with ftengine from `{base_model or 'unknown'}`; this repository holds the "
            f"`{export_format}` export.", ""]
    if details:
        body += ["| | |", "|---|---|"] + [f"| {key} | {value} |" for key, value in details.items()] + [""]
    return "\n".join(header + body)


def push_folder(folder: Path, repo_id: str, token: str | None = None, private: bool | None = None,
                card: str | None = None) -> str:
    """Create ``repo_id`` if needed and upload ``folder`` in one commit, ``card`` written as its README.md.

    Returns:
        The repository's URL.

    Raises:
        ConfigError: a malformed repository id or no token (see :func:`check_push`).
    """
    from huggingface_hub import HfApi

    resolved = check_push(repo_id, token, "push_to_hub")
    if card is not None:  # in place of a library's template card (peft writes one)
        (folder / "README.md").write_text(card, encoding="utf-8")
    api = HfApi(token=resolved)
    url = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
    api.upload_folder(repo_id=repo_id, folder_path=str(folder), repo_type="model",
                      commit_message="Upload model fine-tuned with ftengine")
    return str(url)


def push_export(target: Path, entry: Any, details: dict[str, Any] | None = None) -> str | None:
    """Upload the export at ``target`` if its ``export:`` entry says ``push_to_hub``; the line to report."""
    extra = entry.model_extra or {}
    repo_id = extra.get("push_to_hub")
    if not repo_id:
        return None
    base_model = (details or {}).get("base model")
    url = push_folder(target, repo_id, private=extra.get("private"),
                      card=model_card(repo_id, base_model, entry.format, details or {}))
    return f"pushed to {url}"
