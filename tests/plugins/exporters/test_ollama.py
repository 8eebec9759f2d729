"""The Ollama Modelfile: its lines, and Go templates shaped like the Jinja templates they stand for.

Without Go the templates cannot be executed here; instead every piece of literal text in a Go
template must appear in the Jinja rendering of a conversation, and the text after the last turn
(the generation prompt) must be exactly the Jinja template's generation prompt.
"""

import re

import jinja2
import pytest
from jinja2.sandbox import ImmutableSandboxedEnvironment

from ftengine.core.errors import ExportError
from ftengine.core.plugins import get_registry
from ftengine.plugins.exporters.gguf.ollama import GO_TEMPLATES
from ftengine.plugins.exporters.gguf.ollama import modelfile

CONVERSATION = [
    {"role": "system", "content": "SYSTEM-TEXT"},
    {"role": "user", "content": "USER-ONE"},
    {"role": "assistant", "content": "ASSISTANT-ONE"},
    {"role": "user", "content": "USER-TWO"},
]
_ACTION = re.compile(r"(\{\{.*?\}\})", re.S)


def _render(jinja: str, messages: list[dict], generation: bool, eos_token: str = "</s>") -> str:
    def raise_exception(message):
        raise jinja2.TemplateError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = raise_exception
    return env.from_string(jinja).render(messages=messages, add_generation_prompt=generation, bos_token="<s>",
                                         eos_token=eos_token, date_string="26 Jul 2024")


def _literals(go: str) -> list[str]:
    """Literal text between actions, with Go's ``{{-`` / ``-}}`` whitespace trimming applied."""
    parts = _ACTION.split(go)
    texts = []
    for i in range(0, len(parts), 2):
        text = parts[i]
        if i > 0 and parts[i - 1].endswith("-}}"):
            text = text.lstrip()
        if i + 1 < len(parts) and parts[i + 1].startswith("{{-"):
            text = text.rstrip()
        texts.append(text)
    return texts


def _registered() -> dict:
    return {name: t for name, t in get_registry("chat_templates").items() if t.jinja is not None}


def test_every_shipped_chat_template_has_an_ollama_template():
    assert set(_registered()) <= set(GO_TEMPLATES)


@pytest.mark.parametrize("name", sorted(GO_TEMPLATES))
def test_go_template_is_balanced(name):
    go = GO_TEMPLATES[name]
    opens = len(re.findall(r"\{\{-?\s*(?:if|range)\b", go))
    ends = len(re.findall(r"\{\{-?\s*end\s*-?\}\}", go))
    assert opens == ends
    assert go.count("{{") == go.count("}}")
    assert "{{ .Content }}" in go and ".Messages" in go and ".System" in go


def _renderings(jinja: str) -> list[str]:
    """The conversation with and without a system turn (a template that rejects system turns gets the
    system text folded into the first user turn, as its Ollama template does)."""
    without = _render(jinja, CONVERSATION[1:], generation=True)
    try:
        with_system = _render(jinja, CONVERSATION, generation=True)
    except jinja2.TemplateError:
        folded = [{"role": "user", "content": "SYSTEM-TEXT\n\nUSER-ONE"}, *CONVERSATION[2:]]
        with_system = _render(jinja, folded, generation=True)
    return [with_system, without]


def _generation_prompt(jinja: str) -> str:
    one_turn = CONVERSATION[1:2]
    prompted, plain = _render(jinja, one_turn, True, "\0"), _render(jinja, one_turn, False, "\0")
    common = 0
    while common < min(len(prompted), len(plain)) and prompted[common] == plain[common]:
        common += 1
    return prompted[common:]


@pytest.mark.parametrize("name", sorted(GO_TEMPLATES))
def test_go_template_text_matches_the_jinja_rendering(name):
    template = _registered().get(name)
    if template is None:
        pytest.skip(f"chat template {name!r} is not registered")
    renderings = _renderings(template.jinja)
    for text in _literals(GO_TEMPLATES[name]):
        assert any(text in rendered for rendered in renderings), (name, text, renderings)
    assert _literals(GO_TEMPLATES[name])[-1] == _generation_prompt(template.jinja)


def test_modelfile_lines():
    text, note = modelfile("model-q4_k_m.gguf", "llama-3.1", ["<|eot_id|>", "<|end_of_text|>", "<|eot_id|>"],
                           system="You are terse.", parameters={"temperature": 0.2, "num_ctx": 4096})
    assert note is None
    lines = text.splitlines()
    assert lines[0] == "FROM ./model-q4_k_m.gguf"
    assert text.count('TEMPLATE """') == 1 and "<|start_header_id|>assistant<|end_header_id|>" in text
    assert 'SYSTEM """You are terse."""' in lines
    assert [line for line in lines if line.startswith("PARAMETER stop")] == [
        "PARAMETER stop <|eot_id|>", "PARAMETER stop <|end_of_text|>"
    ]
    assert "PARAMETER temperature 0.2" in lines and "PARAMETER num_ctx 4096" in lines
    assert "PARAMETER top_p 0.9" in lines


def test_modelfile_uses_the_models_own_bos_and_eos():
    text, _ = modelfile("m.gguf", "alpaca", ["<|im_end|>"], eos_token="<|im_end|>", bos_token="<|im_start|>")
    assert "{{ .Content }}<|im_end|>" in text and "</s>" not in text
    text, _ = modelfile("m.gguf", "llama-2", ["</s>"], eos_token="</s>", bos_token="<s>")
    assert "{{ .Content }} </s><s>" in text


def test_modelfile_for_an_unknown_template_says_so():
    text, note = modelfile("m.gguf", "my-own", ["### End", "</s>"])
    assert "TEMPLATE" not in text.replace("no Ollama TEMPLATE", "")
    assert "'my-own'" in note and "chatml" in note
    assert f"# {note}" in text
    assert 'PARAMETER stop """### End"""' in text  # a stop string with a space is quoted


def test_modelfile_refuses_unquotable_text():
    with pytest.raises(ExportError, match='cannot contain """'):
        modelfile("m.gguf", "chatml", [], system='say """hi"""')


@pytest.mark.parametrize("parameters", [{"temperature": "0.7\nADAPTER ./evil.gguf"}, {"top_p\nFROM x": 1},
                                        {"temperature": float("nan")}])
def test_no_directive_injection_through_parameters(parameters):
    from ftengine.plugins.exporters.gguf.exporter import GGUFOptions

    with pytest.raises(ValueError, match="PARAMETER"):
        GGUFOptions(parameters=parameters)
    if all(k.isidentifier() for k in parameters) and isinstance(next(iter(parameters.values())), str):
        with pytest.raises(ExportError, match="one-line printable"):
            modelfile("m.gguf", "chatml", [], parameters=parameters)


def test_stop_tokens_and_system_cannot_start_a_directive():
    text, _ = modelfile("m.gguf", "chatml", ["</s>\nFROM ./evil.gguf"], system="be brief\nFROM ./evil.gguf")
    directives = [line.split()[0] for line in text.splitlines() if line and not line.startswith((" ", "#"))]
    # Every line that starts a directive is one the exporter wrote: the injected FROM stays inside quotes.
    assert text.count('"""') % 2 == 0
    outside = text.split('"""')[0::2]
    assert sum(part.count("FROM") for part in outside) == 1
    assert 'PARAMETER stop """</s>\nFROM ./evil.gguf"""' in text
    assert directives[0] == "FROM"
