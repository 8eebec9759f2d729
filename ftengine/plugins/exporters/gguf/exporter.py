"""The ``gguf`` exporter: GGUF files for llama.cpp, an Ollama ``Modelfile`` beside each.

One quantization writes ``model-<type>.gguf`` and ``Modelfile`` into the export directory; a list
writes one sub-directory per type (``<type>/model-<type>.gguf`` and its ``Modelfile``), the LoRA
merged once for all. With ``imatrix`` the K-quant, IQ4 and legacy 4-/5-bit types are quantized against an
importance matrix, computed here (and saved as ``imatrix.gguf``) or read from a llama.cpp file. A
vision-language model's export adds ``mmproj-<name>-f16.gguf`` (its vision tower and projector, once
for all types) beside them, and each Modelfile names both files.
"""

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
from ftengine.plugins.exporters.gguf.calibration import rows_from_dataset
from ftengine.plugins.exporters.gguf.calibration import rows_from_file
from ftengine.plugins.exporters.gguf.imatrix import ImportanceMatrix
from ftengine.plugins.exporters.gguf.imatrix import collect
from ftengine.plugins.exporters.gguf.mmproj import MmprojWriter
from ftengine.plugins.exporters.gguf.mmproj import file_name
from ftengine.plugins.exporters.gguf.mmproj import is_vision_language
from ftengine.plugins.exporters.gguf.mmproj import mmproj_layout
from ftengine.plugins.exporters.gguf.mmproj import tower_keys
from ftengine.plugins.exporters.gguf.ollama import modelfile
from ftengine.plugins.exporters.gguf.writer import resolve_layout
from ftengine.plugins.exporters.gguf.writer import write_ggufs

PARAMETER_NAME = re.compile(r"[a-z][a-z0-9_]*")
"""An Ollama ``PARAMETER`` name: a value from the config can never start another Modelfile directive."""


class GGUFOptions(BaseModel):
    """Options of the ``gguf`` export."""

    model_config = ConfigDict(extra="forbid")

    quantization: str | list[str] = Field(
        "q8_0", description=f"tensor type mix, or a list of them (one file each): {', '.join(mixes.QUANTIZATIONS)} "
        f"(llama.cpp's names), or {', '.join(mixes.ALIASES)}"
    )
    imatrix: bool | str = Field(
        False, description="importance matrix for the K-quant, IQ4 and Q4_0/Q4_1/Q5_0/Q5_1 types: true computes one "
        "from calibration text (imatrix_data, else a sample of the run's training data) and saves it as imatrix.gguf; "
        "a path reads a llama.cpp imatrix file (.gguf or legacy .dat)"
    )
    imatrix_data: str | None = Field(
        None, description="calibration text for imatrix: true (a .txt file, or .json/.jsonl whose strings are used)"
    )
    imatrix_chunks: int = Field(64, ge=1, description="imatrix: true runs at most this many chunks of text")
    imatrix_chunk_size: int = Field(512, ge=16, description="tokens per imatrix chunk (capped at the model's "
                                    "context length)")
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
    def _known_quantization(cls, value: str | list[str]) -> str | list[str]:
        names = [value] if isinstance(value, str) else value
        if not names:
            raise ValueError("an empty list; name at least one quantization")
        try:
            checked = list(dict.fromkeys(mixes.check_quantization(name) for name in names))
        except ExportError as exc:
            raise ValueError(str(exc)) from exc
        return checked[0] if isinstance(value, str) else checked


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


def gguf_name_of(model: Any) -> Any:
    """Checkpoint weight name -> GGUF tensor name, as the file holds them (the tied output is token_embd)."""
    layout = resolve_layout(model.config)
    text = getattr(model.config, "text_config", None) or model.config
    tied = bool(getattr(text, "tie_word_embeddings", False))

    def name_of(hf_name: str) -> str | None:
        name = layout.tensor_name(hf_name)
        return "token_embd.weight" if tied and name == "output.weight" else name

    return name_of


def importance_matrix(model: Any, tokenizer: Any, options: GGUFOptions, calibration: Any, out_dir: Path
                      ) -> tuple[ImportanceMatrix | None, list[str]]:
    """The importance matrix the options ask for (``None`` without ``imatrix``) and summary lines."""
    if options.imatrix is False:
        return None, []
    if isinstance(options.imatrix, str):
        loaded = ImportanceMatrix.load(Path(options.imatrix))
        return loaded, [f"importance matrix: {options.imatrix} ({len(loaded.sums)} entries)"]
    if options.imatrix_data is not None:
        rows: Any = rows_from_file(options.imatrix_data, tokenizer)
        source = str(options.imatrix_data)
    elif calibration is not None:
        rows, source = rows_from_dataset(calibration, tokenizer), "training data"
    else:
        raise ExportError("export gguf: imatrix: true needs calibration text: set imatrix_data to a .txt/.jsonl "
                          "file (an export during a training run uses a sample of its training data)")
    text = getattr(model.config, "text_config", None) or model.config
    chunk = min(options.imatrix_chunk_size, int(getattr(text, "max_position_embeddings", 0) or 1 << 30))
    computed = collect(model, rows, gguf_name_of(model), chunk, options.imatrix_chunks, source)
    path = computed.save(out_dir / "imatrix.gguf")
    return computed, [f"importance matrix: {computed.chunk_count} chunk(s) of {chunk} tokens from {source}, "
                      f"saved as {path}"]


class GGUFExporter:
    """Writes ``model-<quantization>.gguf`` (llama.cpp) and a ``Modelfile`` (Ollama), per quantization."""

    name = "gguf"
    description = "GGUF for llama.cpp and Ollama (f16, q8_0, q4_k_m, q3_k_s, iq4_xs, ...), imatrix, Modelfile"
    options_schema = GGUFOptions

    def check(self, options: GGUFOptions, config: Any, hf_config: Any) -> list[str]:
        """Before training: the model type has a GGUF layout (and a vision-language one an mmproj layout its
        tower fits) and a named ``chat_template`` is registered."""
        problems = []
        try:
            if is_vision_language(hf_config):
                tower_keys(mmproj_layout(hf_config), hf_config)
            resolve_layout(hf_config)
        except ExportError as exc:
            problems.append(str(exc))
        if options.chat_template is not None and options.chat_template not in get_registry("chat_templates"):
            problems.append(f"chat_template: no chat template named {options.chat_template!r}; registered: "
                            f"{', '.join(sorted(get_registry('chat_templates')))}")
        return problems

    def export(self, model: Any, tokenizer: Any, out_dir: Path, options: Any, calibration: Any = None) -> list[str]:
        """Write the GGUF file(s) and Modelfile(s) into ``out_dir`` (and a vision-language model's mmproj file).

        Args:
            model: the trained model (plain or peft; LoRA is merged on the fly).
            tokenizer: its fast tokenizer (vocabulary and chat template go into the file), or a
                vision-language model's processor (its tokenizer, and its image mean and std for the mmproj).
            out_dir: the directory to write into.
            options: a :class:`GGUFOptions` (or a dict of its fields, or ``None`` for the defaults).
            calibration: the run's training rows, the default calibration text of ``imatrix: true``.

        Returns:
            Lines describing what was written.

        Raises:
            ExportError: bad options, an unsupported architecture or tokenizer, no calibration text,
                or too little disk space, all before any GGUF file is written.
        """
        if options is None:
            options = GGUFOptions()
        elif isinstance(options, dict):
            try:
                options = GGUFOptions(**options)
            except ValueError as exc:
                raise ExportError(f"invalid gguf export options: {exc}") from exc
        out_dir = Path(out_dir)
        processor, tokenizer = tokenizer, getattr(tokenizer, "tokenizer", tokenizer)
        vision = None
        if is_vision_language(model.config):
            vision = MmprojWriter(model, processor, out_dir / file_name(model.config))
        out_dir.mkdir(parents=True, exist_ok=True)
        template = _template(tokenizer, options.chat_template)
        several = not isinstance(options.quantization, str)
        quantizations = options.quantization if several else [options.quantization]
        directories = {q: out_dir / q if several else out_dir for q in quantizations}
        imatrix, lines = importance_matrix(model, tokenizer, options, calibration, out_dir)
        targets = {q: directories[q] / f"model-{q}.gguf" for q in quantizations}
        lines = write_ggufs(model, tokenizer, targets, imatrix=imatrix, sink=vision) + lines
        if vision is not None:
            lines += vision.write()
        stops = list(template.stop_tokens) if template is not None and template.stop_tokens else []
        if not stops and getattr(tokenizer, "eos_token", None):
            stops = [tokenizer.eos_token]
        for q, directory in directories.items():
            projector = None if vision is None else f"{'..' if several else '.'}/{vision.path.name}"
            text, note = modelfile(targets[q].name, template.name if template else None, stops, options.system,
                                   options.parameters, getattr(tokenizer, "bos_token", None),
                                   getattr(tokenizer, "eos_token", None), projector=projector)
            (directory / "Modelfile").write_text(text, encoding="utf-8")
            lines.append(f"Modelfile: ollama create <name> -f {directory / 'Modelfile'}")
            if note and q == quantizations[-1]:
                lines.append(f"note: {note}")
        if vision is not None:
            lines.append(f"llama.cpp: llama-mtmd-cli -m {targets[quantizations[0]]} --mmproj {vision.path} "
                         f"--image <image> -p <prompt>")
        return lines
