"""An Ollama ``Modelfile`` for a GGUF export: ``FROM``, ``TEMPLATE``, ``PARAMETER``s, ``SYSTEM``.

Ollama renders prompts with Go's ``text/template``, not Jinja, so each chat template ftengine ships
has its Ollama counterpart here, keyed by the template's registered name. They use Ollama's
``.Messages`` form: the system prompt comes as ``.System``, turns as ``.Messages`` (system turns
in that list are skipped, ``.System`` already holds them), and the prompt ends with the opening of
the assistant's turn. Ollama adds the bos token itself (GGUF ``tokenizer.ggml.add_bos_token``), so
no template writes it at the start. Where a template's Jinja writes the tokenizer's ``eos_token`` /
``bos_token`` between turns, the Go template has ``</s>`` / ``<s>``, and :func:`modelfile` puts the
model's own tokens in their place.
"""

from __future__ import annotations

from typing import Any

from ftengine.core.errors import ExportError

_SYSTEM_FIRST_USER = '{{- $system := .System }}'
"""Prelude of templates that fold the system prompt into the first user turn (Llama 2, Mistral, Gemma)."""

CHATML = """{{- if .System }}<|im_start|>system
{{ .System }}<|im_end|>
{{ end }}
{{- range .Messages }}
{{- if or (eq .Role "user") (eq .Role "assistant") }}<|im_start|>{{ .Role }}
{{ .Content }}<|im_end|>
{{ end }}
{{- end }}<|im_start|>assistant
"""

QWEN25 = """{{- if .System }}<|im_start|>system
{{ .System }}<|im_end|>
{{ else }}<|im_start|>system
You are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>
{{ end }}
{{- range .Messages }}
{{- if or (eq .Role "user") (eq .Role "assistant") }}<|im_start|>{{ .Role }}
{{ .Content }}<|im_end|>
{{ end }}
{{- end }}<|im_start|>assistant
"""

LLAMA3 = """{{- if .System }}<|start_header_id|>system<|end_header_id|>

{{ .System }}<|eot_id|>
{{- end }}
{{- range .Messages }}
{{- if or (eq .Role "user") (eq .Role "assistant") }}<|start_header_id|>{{ .Role }}<|end_header_id|>

{{ .Content }}<|eot_id|>
{{- end }}
{{- end }}<|start_header_id|>assistant<|end_header_id|>

"""

LLAMA2 = _SYSTEM_FIRST_USER + """
{{- range .Messages }}
{{- if eq .Role "user" }}[INST] {{ if $system }}<<SYS>>
{{ $system }}
<</SYS>>

{{ $system = "" }}{{ end }}{{ .Content }} [/INST]
{{- else if eq .Role "assistant" }} {{ .Content }} </s><s>
{{- end }}
{{- end }}"""

MISTRAL = _SYSTEM_FIRST_USER + """
{{- range .Messages }}
{{- if eq .Role "user" }} [INST] {{ if $system }}{{ $system }}

{{ $system = "" }}{{ end }}{{ .Content }} [/INST]
{{- else if eq .Role "assistant" }} {{ .Content }}</s>
{{- end }}
{{- end }}"""

GEMMA = _SYSTEM_FIRST_USER + """
{{- range .Messages }}
{{- if eq .Role "user" }}<start_of_turn>user
{{ if $system }}{{ $system }}

{{ $system = "" }}{{ end }}{{ .Content }}<end_of_turn>
{{ else if eq .Role "assistant" }}<start_of_turn>model
{{ .Content }}<end_of_turn>
{{ end }}
{{- end }}<start_of_turn>model
"""

PHI3 = """{{- if .System }}<|system|>
{{ .System }}<|end|>
{{ end }}
{{- range .Messages }}
{{- if or (eq .Role "user") (eq .Role "assistant") }}<|{{ .Role }}|>
{{ .Content }}<|end|>
{{ end }}
{{- end }}<|assistant|>
"""

PHI4 = """{{- if .System }}<|im_start|>system<|im_sep|>{{ .System }}<|im_end|>{{ end }}
{{- range .Messages }}
{{- if or (eq .Role "user") (eq .Role "assistant") }}<|im_start|>{{ .Role }}<|im_sep|>{{ .Content }}<|im_end|>
{{- end }}
{{- end }}<|im_start|>assistant<|im_sep|>"""

ZEPHYR = """{{- if .System }}<|system|>
{{ .System }}</s>
{{ end }}
{{- range .Messages }}
{{- if or (eq .Role "user") (eq .Role "assistant") }}<|{{ .Role }}|>
{{ .Content }}</s>
{{ end }}
{{- end }}<|assistant|>
"""

VICUNA = (
    "{{- if .System }}{{ .System }}{{ else }}A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions.{{ end }}{{ \" \" }}"
    """
{{- range .Messages }}
{{- if eq .Role "user" }}USER: {{ .Content }}{{ " " }}
{{- else if eq .Role "assistant" }}ASSISTANT: {{ .Content }}</s>
{{- end }}
{{- end }}ASSISTANT:"""
)

ALPACA = (
    "{{- $first := true }}{{- if .System }}{{ .System }}{{ else }}Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.{{ end }}{{ \"\\n\\n\" }}"
    """
{{- range .Messages }}
{{- if eq .Role "user" }}{{ if not $first }}{{ "\\n\\n" }}{{ end }}{{ $first = false }}### Instruction:
{{ .Content }}

### Response:
{{- else if eq .Role "assistant" }}{{ .Content }}</s>
{{- end }}
{{- end }}"""
)

GO_TEMPLATES: dict[str, str] = {
    "chatml": CHATML,
    "qwen2.5": QWEN25,
    "qwen3": CHATML,  # a prompt ends after a user turn, where Qwen3 writes earlier answers without think blocks
    "llama-3": LLAMA3,
    "llama-3.1": LLAMA3,
    "llama-3.2": LLAMA3,
    "llama-3.3": LLAMA3,
    "llama-2": LLAMA2,
    "mistral": MISTRAL,
    "gemma": GEMMA,
    "gemma-2": GEMMA,
    "gemma-3": GEMMA,
    "phi-3": PHI3,
    "phi-3.5": PHI3,
    "phi-4": PHI4,
    "zephyr": ZEPHYR,
    "vicuna": VICUNA,
    "alpaca": ALPACA,
}
"""Registered chat-template name -> its Ollama Go template."""

DEFAULT_PARAMETERS: dict[str, Any] = {"temperature": 0.7, "top_p": 0.9, "repeat_penalty": 1.1}
"""Sampling defaults written as ``PARAMETER`` lines (a user's ``parameters`` option overrides them)."""


def _quote(text: str) -> str:
    """A Modelfile string: triple-quoted (Ollama reads it verbatim up to the closing ``\"\"\"``), so a
    value can hold any text but that closing quote, which would end it and start a directive."""
    if '"""' in text or "\0" in text:
        raise ExportError(f'a Modelfile value cannot contain """ or a NUL character: {text[:80]!r}')
    return f'"""{text}"""'


def _token(text: str) -> str:
    """A stop token: bare when it is one printable word, triple-quoted otherwise."""
    return text if text and all(c.isprintable() and not c.isspace() and c != '"' for c in text) else _quote(text)


def _value(key: str, value: Any) -> str:
    """A ``PARAMETER`` value on one line (numbers as they are, strings without line breaks)."""
    text = str(value)
    if not text or any(not c.isprintable() for c in text):
        raise ExportError(f"Ollama PARAMETER {key}: expected a one-line printable value, got {value!r}")
    return text


def modelfile(
    gguf_name: str,
    template_name: str | None,
    stop_tokens: list[str],
    system: str | None = None,
    parameters: dict[str, Any] | None = None,
    bos_token: str | None = None,
    eos_token: str | None = None,
    projector: str | None = None,
) -> tuple[str, str | None]:
    """The text of a Modelfile.

    Args:
        gguf_name: the GGUF file's name, beside the Modelfile (``FROM ./<name>``).
        template_name: the registered chat-template name the model was trained with, if known.
        stop_tokens: strings that end a reply (one ``PARAMETER stop`` each).
        system: an optional default system prompt.
        parameters: extra or overriding ``PARAMETER`` values.
        bos_token / eos_token: the tokenizer's, written where the template has ``<s>`` / ``</s>``.
        projector: a vision-language model's mmproj file as a path relative to the Modelfile
            (``./mmproj-....gguf``), written as a second ``FROM``: Ollama takes a ``clip`` GGUF as the
            model's projector.

    Returns:
        ``(text, note)``: ``note`` explains a missing ``TEMPLATE`` (an unknown template: Ollama then
        uses the chat template stored in the GGUF file, if its own detection recognises it), else
        ``None``.
    """
    lines = [f"FROM ./{gguf_name}"] + ([f"FROM {projector}"] if projector else []) + [""]
    note = None
    template = GO_TEMPLATES.get(template_name or "")
    if template is not None:
        template = template.replace("</s>", eos_token or "</s>").replace("<s>", bos_token or "<s>")
        lines += [f"TEMPLATE {_quote(template)}", ""]
    else:
        shown = repr(template_name) if template_name else "the tokenizer's own template"
        note = (f"no Ollama TEMPLATE for {shown}; Ollama falls back to the chat template in the GGUF file "
                f"(known templates: {', '.join(GO_TEMPLATES)})")
        lines += [f"# {' '.join(note.splitlines())}", ""]
    if system:
        lines += [f"SYSTEM {_quote(system)}", ""]
    for stop in dict.fromkeys(stop_tokens):
        lines.append(f"PARAMETER stop {_token(stop)}")
    for key, value in {**DEFAULT_PARAMETERS, **(parameters or {})}.items():
        lines.append(f"PARAMETER {key} {_value(key, value)}")
    return "\n".join(lines) + "\n", note
