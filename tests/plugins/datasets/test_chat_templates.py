"""Chat templates: each renders what the vendor's official template renders, and is prefix-consistent.

The official texts live in ``official_templates/`` (sources in its README and ``sources.json``).
Both sides are rendered with transformers' own ``apply_chat_template`` on a tiny tokenizer that
knows the special tokens.
"""

import json
from functools import cache
from pathlib import Path

import pytest
from jinja2.exceptions import TemplateError
from tokenizers import Tokenizer
from tokenizers import models
from tokenizers import pre_tokenizers
from transformers import PreTrainedTokenizerFast

from ftengine.core.plugins import Registries
from ftengine.core.types import ChatTemplate
from ftengine.plugins.datasets.templates import TEMPLATES

OFFICIAL = Path(__file__).parent / "official_templates"
SOURCES = json.loads((OFFICIAL / "sources.json").read_text())
BY_NAME = {t.name: t for t in TEMPLATES}

SYSTEM = {"role": "system", "content": "You are a terse assistant."}
U1 = {"role": "user", "content": "What is 2 + 2?"}
A1 = {"role": "assistant", "content": "4."}
U2 = {"role": "user", "content": "Line one\nLine two: ünïcødé ✓ {{ not jinja }}"}
A2 = {"role": "assistant", "content": "Answer with 'single' and \"double\" quotes.\n\n- and a list"}

CONVERSATIONS = {
    "single": [U1, A1],
    "system": [SYSTEM, U1, A1],
    "multi": [U1, A1, U2, A2],
    "multi_system": [SYSTEM, U1, A1, U2, A2],
    "prompt": [U1],
    "system_prompt": [SYSTEM, U1],
    "multi_prompt": [SYSTEM, U1, A1, U2],
    "whitespace": [{"role": "user", "content": "  Hi there \n"}, {"role": "assistant", "content": "\n Hello!  "}],
    "empty_system": [{"role": "system", "content": ""}, U1, A1],
}
RENDER_KWARGS = ({}, {"date_string": "05 Mar 2025"})


@cache
def _tokenizer(bos: str | None, eos: str | None) -> PreTrainedTokenizerFast:
    specials = {"bos_token": bos, "eos_token": eos}
    vocab = {"[UNK]": 0, **{token: i + 1 for i, token in enumerate(sorted({t for t in specials.values() if t}))}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]",
                                   **{k: v for k, v in specials.items() if v})


def render(jinja: str, bos: str | None, eos: str | None, messages: list, generation: bool, **kwargs) -> str:
    return _tokenizer(bos, eos).apply_chat_template(
        messages, tokenize=False, add_generation_prompt=generation, chat_template=jinja, **kwargs
    )


def outcome(jinja: str, bos: str | None, eos: str | None, messages: list, generation: bool, **kwargs) -> tuple:
    """("text", rendered) or ("error", message) when the template raises."""
    try:
        return "text", render(jinja, bos, eos, messages, generation, **kwargs)
    except TemplateError as error:
        return "error", str(error)


def tokens(template: ChatTemplate) -> tuple[str | None, str | None]:
    """The bos/eos the core would set: the template's, else the vendor tokenizer's."""
    vendor = SOURCES.get(template.name, {"bos_token": "<s>", "eos_token": "</s>"})
    return template.bos_token or vendor["bos_token"], template.eos_token or vendor["eos_token"]


def test_every_named_template_is_registered():
    names = ["qwen2.5", "qwen3", "llama-3", "llama-3.1", "llama-3.2", "llama-3.3", "llama-2", "mistral", "gemma",
             "gemma-2", "gemma-3", "phi-3", "phi-3.5", "phi-4", "chatml", "zephyr", "vicuna", "alpaca", "tokenizer"]
    assert sorted(BY_NAME) == sorted(names)
    regs = Registries()
    import ftengine.plugins.datasets as plugin

    info = regs.add_plugin(plugin, name="datasets-under-test")
    assert info.error is None
    assert sorted(info.registered["chat_templates"]) == sorted(names)
    assert sorted(info.registered["formats"]) == ["alpaca", "completion", "messages", "preference", "prompt",
                                                  "segments", "sharegpt", "text", "unpaired_preference", "vision"]
    assert regs.entries["chat_templates"]["qwen2.5"].obj is BY_NAME["qwen2.5"]


def test_tokenizer_template_keeps_the_tokenizers_own():
    template = BY_NAME["tokenizer"]
    assert template.jinja is None
    assert (template.bos_token, template.eos_token, template.pad_token, template.stop_tokens) == (None, None, None, ())


@pytest.mark.parametrize("name", sorted(SOURCES))
def test_special_tokens_match_the_vendors(name):
    template, vendor = BY_NAME[name], SOURCES[name]
    for key in ("bos_token", "eos_token"):
        if getattr(template, key) is not None:
            assert getattr(template, key) == vendor[key]
    assert template.stop_tokens


@pytest.mark.parametrize("name", sorted(SOURCES))
def test_renders_like_the_official_template(name):
    ours, official = BY_NAME[name], (OFFICIAL / f"{name}.jinja").read_text()
    vendor = SOURCES[name]
    bos, eos = tokens(ours)
    mismatches, rendered = [], 0
    for label, messages in CONVERSATIONS.items():
        for generation in (False, True):
            for kwargs in RENDER_KWARGS:
                expected = outcome(official, vendor["bos_token"], vendor["eos_token"], messages, generation, **kwargs)
                got = outcome(ours.jinja, bos, eos, messages, generation, **kwargs)
                rendered += expected[0] == "text"
                if got != expected:
                    mismatches.append((label, generation, kwargs, expected, got))
    assert mismatches == []
    assert rendered >= len(CONVERSATIONS)  # most cases render text, not an error on both sides


@pytest.mark.parametrize("name", ["gemma", "gemma-2"])
def test_gemma_rejects_a_system_message_like_the_official(name):
    kind, message = outcome(BY_NAME[name].jinja, "<bos>", "<eos>", CONVERSATIONS["system"], False)
    assert (kind, message) == ("error", "System role not supported")


@pytest.mark.parametrize("name", ["llama-3.1", "llama-3.2", "llama-3.3"])
def test_llama_date_string(name):
    text = render(BY_NAME[name].jinja, "<|begin_of_text|>", "<|eot_id|>", [U1, A1], False, date_string="05 Mar 2025")
    assert text.startswith(
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n"
        "Cutting Knowledge Date: December 2023\nToday Date: 05 Mar 2025\n\n<|eot_id|>"
    )
    if name != "llama-3.2":  # 3.2 dates an undated render with the day of rendering
        assert "Today Date: 26 Jul 2024\n" in render(BY_NAME[name].jinja, "<|begin_of_text|>", "<|eot_id|>", [U1], True)


VICUNA_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)


def fastchat_vicuna(messages: list, generation: bool) -> str:
    """FastChat's ``vicuna_v1.1`` prompt (``SeparatorStyle.ADD_COLON_TWO``, ``sep=" "``, ``sep2="</s>"``),
    with the tokenizer's bos in front."""
    system = VICUNA_SYSTEM
    if messages[0]["role"] == "system":
        system, messages = messages[0]["content"], messages[1:]
    turns = [("USER" if m["role"] == "user" else "ASSISTANT", m["content"]) for m in messages]
    if generation:
        turns.append(("ASSISTANT", None))
    separators = (" ", "</s>")
    prompt = system + separators[0]
    for i, (role, text) in enumerate(turns):
        prompt += f"{role}: {text}{separators[i % 2]}" if text else f"{role}:"
    return "<s>" + prompt


def test_vicuna_renders_fastchats_vicuna_v1_1():
    checked = 0
    for messages in CONVERSATIONS.values():
        for generation in (False, True):
            if generation and messages[-1]["role"] == "assistant":
                continue  # FastChat always prompts after a user turn
            assert render(BY_NAME["vicuna"].jinja, "<s>", "</s>", messages, generation) == fastchat_vicuna(
                messages, generation
            )
            checked += 1
    assert checked == 12


ALPACA_PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:"
)


def test_alpaca_renders_stanford_alpacas_prompt():
    jinja = BY_NAME["alpaca"].jinja
    stanford = "<s>" + ALPACA_PROMPT_NO_INPUT.format(instruction=U1["content"])
    assert render(jinja, "<s>", "</s>", [U1, A1], False) == stanford + A1["content"] + "</s>"
    assert render(jinja, "<s>", "</s>", [U1], True) == stanford
    assert render(jinja, "<s>", "</s>", [SYSTEM, U1, A1, U2, A2], False) == (
        f"<s>{SYSTEM['content']}\n\n### Instruction:\n{U1['content']}\n\n### Response:{A1['content']}</s>"
        f"\n\n### Instruction:\n{U2['content']}\n\n### Response:{A2['content']}</s>"
    )


def _assistant_turns(messages: list) -> list[int]:
    return [i for i, m in enumerate(messages) if m["role"] == "assistant"]


RENDERED_TEMPLATES = [t.name for t in TEMPLATES if t.jinja is not None]


@pytest.mark.parametrize("name", RENDERED_TEMPLATES)
def test_prefix_consistent(name):
    """render(messages[:i], add_generation_prompt=True) is a prefix of render(messages[:i + 1]) and of the
    whole conversation's render, for every assistant turn i."""
    template = BY_NAME[name]
    bos, eos = tokens(template)
    checked = 0
    for messages in CONVERSATIONS.values():
        if outcome(template.jinja, bos, eos, messages, False)[0] == "error":
            continue  # Gemma 1/2 refuse system messages
        whole = render(template.jinja, bos, eos, messages, False, date_string="05 Mar 2025")
        for i in _assistant_turns(messages):
            prompt = render(template.jinja, bos, eos, messages[:i], True, date_string="05 Mar 2025")
            turn = render(template.jinja, bos, eos, messages[: i + 1], False, date_string="05 Mar 2025")
            assert turn.startswith(prompt), (messages, i)
            assert whole.startswith(prompt), (messages, i)
            checked += 1
    assert checked >= 4


def test_closed_turns_are_prefixes_except_phi3_and_qwen3():
    """render(messages[:i + 1]) is a prefix of the whole render for an assistant turn i, except for Phi-3/3.5,
    whose templates end every render without a generation prompt with the eos token, and Qwen3, whose last
    assistant turn carries a think block that earlier turns drop."""
    breaks = set()
    for name in RENDERED_TEMPLATES:
        template = BY_NAME[name]
        bos, eos = tokens(template)
        messages = CONVERSATIONS["multi"]
        whole = render(template.jinja, bos, eos, messages, False, date_string="05 Mar 2025")
        if not whole.startswith(render(template.jinja, bos, eos, messages[:2], False, date_string="05 Mar 2025")):
            breaks.add(name)
    assert breaks == {"phi-3", "phi-3.5", "qwen3"}


QWEN3_TURN = "<|im_start|>{role}\n{content}<|im_end|>\n"


def qwen3(messages: list, generation: bool = False, **kwargs) -> str:
    return render(BY_NAME["qwen3"].jinja, None, "<|im_end|>", messages, generation, **kwargs)


def test_qwen3_thinks_on_the_turns_after_the_last_user_query():
    """Qwen3's rules: no default system prompt; assistant turns before the last user message keep only their
    answer (reasoning dropped, from ``reasoning_content`` or from ``<think>`` in the content); the last turn
    carries a ``<think>`` block, empty when it has no reasoning."""
    earlier = {"role": "assistant", "content": "<think>\nadd them\n</think>\n\n4."}
    last = {"role": "assistant", "content": A2["content"], "reasoning_content": "\nquote both kinds\n"}
    assert qwen3([SYSTEM, U1, earlier, U2, last]) == (
        QWEN3_TURN.format(role="system", content=SYSTEM["content"])
        + QWEN3_TURN.format(role="user", content=U1["content"])
        + QWEN3_TURN.format(role="assistant", content="4.") + QWEN3_TURN.format(role="user", content=U2["content"])
        + QWEN3_TURN.format(role="assistant", content="<think>\nquote both kinds\n</think>\n\n" + A2["content"]))
    assert qwen3([U1, A1]) == (QWEN3_TURN.format(role="user", content=U1["content"])
                               + QWEN3_TURN.format(role="assistant", content="<think>\n\n</think>\n\n4."))


def test_qwen3_generation_prompt_with_and_without_thinking():
    user = QWEN3_TURN.format(role="user", content=U1["content"])
    assert qwen3([U1], True) == user + "<|im_start|>assistant\n"
    assert qwen3([U1], True, enable_thinking=False) == user + "<|im_start|>assistant\n<think>\n\n</think>\n\n"


def test_qwen3_masks_train_each_answer_and_the_last_think_block():
    """The data stage's masks on Qwen3 renders: an earlier turn trains its answer and end-of-turn token, the last
    turn its think block too (what the model generates after the generation prompt; the last turn's span runs
    to the end of its render, the newline after the end-of-turn token included, as for any ChatML template)."""
    from ftengine.engine.data import conversation_spans

    tokenizer = _tokenizer(None, "<|im_end|>")
    tokenizer.chat_template = BY_NAME["qwen3"].jinja
    text, spans = conversation_spans(tokenizer, [U1, A1, U2, A2], "assistant")
    assert [text[a:b] for a, b in spans] == ["4.<|im_end|>",
                                             "<think>\n\n</think>\n\n" + A2["content"] + "<|im_end|>\n"]
