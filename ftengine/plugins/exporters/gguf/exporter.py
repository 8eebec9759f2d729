"""The ``gguf`` exporter: one GGUF file for llama.cpp and an Ollama ``Modelfile`` beside it."""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

from pydantic import BaseModel
from pydantic import ConfigDict
from pydantic import Field
from pydantic import field_validator

from ftengine.core.errors import ExportError
from ftengine.core.plugins import get_registry
from ftengine.plugins.exporters.gguf import mixes
from ftengine.plugins.exporters.gguf.ollama import modelfile
from ftengine.plugins.exporters.gguf.writer import write_gguf

PARAMETER_NAME = re.compile(r"[a-z][a-z0-9_]*")
"""An Ollama ``PARAMETER`` name: a value from the config can never start another Modelfile directive."""


class GGUFOptions(BaseModel):
    """Options of the ``gguf`` export."""

    model_config = ConfigDict(extra="forbid")

    quantization: str = Field(
        "q8_0", description=f"tensor type mix: one of {', '.join(mixes.QUANTIZATIONS)} (llama.cpp's names)"
    )
    chat_template: str | None = Field(
        None, description="registered chat-template name for the Ollama TEMPLATE (default: the one whose Jinja "
        "equals the tokenizer's chat_template)"
    )
    system: str | None = Field(None, description="default system prompt written as the Modelfile's SYSTEM")
    parameters: dict[str, float | int | str] = Field(
        default_factory=dict, description="extra Ollama PARAMETER values (override temperature, top_p, ...)"
    )

    @field_validator("system")
    @classmethod
    def _quotable(cls, value: str | None) -> str | None:
        if value is not None and ('"""' in value or "\0" in value):
            raise ValueError('the Modelfile SYSTEM prompt cannot contain """ or a NUL character')
        return value

    @field_validator("parameters")
    @classmethod
    def _plain_parameters(cls, value: dict[str, Any]) -> dict[str, Any]:
        for key, item in value.items():
            if not PARAMETER_NAME.fullmatch(key):
                raise ValueError(f"Ollama PARAMETER name {key!r}: expected lowercase letters, digits and _")
            if isinstance(item, float) and not math.isfinite(item):
                raise ValueError(f"Ollama PARAMETER {key}: expected a finite number, got {item!r}")
            if isinstance(item, str) and (not item.strip() or any(not c.isprintable() for c in item)):
                raise ValueError(f"Ollama PARAMETER {key}: expected a one-line printable value, got {item!r}")
        return value

    @field_validator("quantization")
    @classmethod
    def _known_quantization(cls, value: str) -> str:
        if value.lower() not in mixes.QUANTIZATIONS:
            raise ValueError(f"unknown quantization {value!r}; choose one of: {', '.join(mixes.QUANTIZATIONS)}")
        return value.lower()


def _template(tokenizer: Any, name: str | None) -> Any | None:
    """The registered ChatTemplate named ``name``, or the one whose Jinja is the tokenizer's template."""
    templates = get_registry("chat_templates")
    if name is not None:
        if name not in templates:
            raise ExportError(f"no chat template named {name!r}; registered: {', '.join(sorted(templates))}")
        return templates[name]
    source = getattr(tokenizer, "chat_template", None)
    for template in templates.values():
        if template.jinja is not None and template.jinja == source:
            return template
    return None


class GGUFExporter:
    """Writes ``model-<quantization>.gguf`` (llama.cpp) and a ``Modelfile`` (Ollama)."""

    name = "gguf"
    description = "GGUF for llama.cpp and Ollama (f16, bf16, q8_0, q4_k_m, ...), with an Ollama Modelfile"
    options_schema = GGUFOptions

    def export(self, model: Any, tokenizer: Any, out_dir: Path, options: Any) -> list[str]:
        """Write the GGUF file and the Modelfile into ``out_dir``.

        Args:
            model: the trained model (plain or peft; LoRA is merged on the fly).
            tokenizer: its fast tokenizer (vocabulary and chat template go into the file).
            out_dir: the directory to write into.
            options: a :class:`GGUFOptions` (or a dict of its fields, or ``None`` for the defaults).

        Returns:
            Lines describing what was written.

        Raises:
            ExportError: bad options, an unsupported architecture or tokenizer, or too little disk
                space, all before anything is written.
        """
        if options is None:
            options = GGUFOptions()
        elif isinstance(options, dict):
            try:
                options = GGUFOptions(**options)
            except ValueError as exc:
                raise ExportError(f"invalid gguf export options: {exc}") from exc
        out_dir = Path(out_dir)
        template = _template(tokenizer, options.chat_template)
        gguf_name = f"model-{options.quantization}.gguf"
        lines = write_gguf(model, tokenizer, out_dir / gguf_name, options.quantization)
        stops = list(template.stop_tokens) if template is not None and template.stop_tokens else []
        if not stops and getattr(tokenizer, "eos_token", None):
            stops = [tokenizer.eos_token]
        text, note = modelfile(gguf_name, template.name if template else None, stops, options.system,
                               options.parameters, getattr(tokenizer, "bos_token", None),
                               getattr(tokenizer, "eos_token", None))
        (out_dir / "Modelfile").write_text(text, encoding="utf-8")
        lines.append(f"Modelfile: ollama create <name> -f {out_dir / 'Modelfile'}")
        if note:
            lines.append(f"note: {note}")
        return lines
