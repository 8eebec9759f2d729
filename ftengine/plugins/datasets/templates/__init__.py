"""Chat templates: one ``<name>.jinja`` file per template beside this module, and :data:`TEMPLATES`,
the special tokens and stop tokens of each.

Every template renders, for the same conversation, exactly what the vendor's own template renders
(the tests compare them with the vendors' texts), and each is prefix-consistent: the render of the
first ``i`` messages with ``add_generation_prompt=True`` is a prefix of the render of the first
``i + 1`` when message ``i`` is the assistant's, so assistant turns can be located by rendering
prefixes.

Where the files come from:

* ``qwen2.5``, ``llama-2``, ``llama-3``, ``llama-3.1`` (Llama 3.3 ships the same text), ``llama-3.2``,
  ``mistral`` (Mistral-7B-Instruct v0.1; v0.2 and Mixtral-8x7B-Instruct ship the same text), ``gemma``
  (Gemma 2 ships the same text), ``gemma-3``, ``phi-3``, ``phi-3.5``, ``phi-4`` and ``zephyr``: the
  vendor's template from the model's ``tokenizer_config.json``, verbatim.
* ``qwen3``: Qwen3's template (the hybrid thinking models, ``Qwen/Qwen3-*``) as llama.cpp's
  ``models/templates/Qwen-Qwen3-0.6B.jinja`` keeps it.
* ``chatml``: renders what the plain ChatML template renders: no bos, every turn closed with
  ``<|im_end|>\\n``.
* ``vicuna``: Vicuna ships no Jinja; this renders FastChat's ``vicuna_v1.1`` conversation (the system
  text, ``"USER: " + text + " "``, ``"ASSISTANT: " + text + "</s>"``, a bare ``"ASSISTANT:"`` to prompt
  a reply) after the tokenizer's bos.
* ``alpaca``: Stanford Alpaca ships no Jinja; this renders its ``PROMPT_DICT["prompt_no_input"]``
  followed by the output and the eos token, after the tokenizer's bos. A system message replaces
  the opening sentence; later exchanges follow after a blank line.

Behaviours worth knowing: Llama 3.1/3.2/3.3 open with a dated system block (pass ``date_string``,
e.g. ``"26 Jul 2024"``, as a render keyword for a fixed date; without it 3.1/3.3 write "26 Jul 2024"
and 3.2 the day of rendering). Gemma 1 and 2 raise "System role not supported" for a system
message, as the official templates do; Gemma 3 puts it at the top of the first user turn. Phi-3 and
3.5 end a render without a generation prompt with ``<|endoftext|>``; Phi-3.5 drops an empty system
message. Qwen3 renders the assistant turn after the last user message with a
``<think>\\n...\\n</think>\\n\\n`` block (its ``reasoning_content``, or the ``<think>`` part of its
content; empty without either) and earlier turns with their answer only; a generation prompt with
``enable_thinking=False`` ends with an empty think block. Mistral v0.3's own template (system message
joined to the last user turn) cannot be
prefix-consistent; ``mistral`` is the v0.1 text.
"""

from __future__ import annotations

from importlib import resources

from ftengine.core.types import ChatTemplate


def jinja(name: str) -> str:
    """The text of the package file ``<name>.jinja``."""
    return resources.files(__package__).joinpath(f"{name}.jinja").read_text(encoding="utf-8")


_LLAMA31_STOPS = ("<|eot_id|>", "<|eom_id|>", "<|end_of_text|>")
_GEMMA_STOPS = ("<end_of_turn>", "<eos>")


def _template(name: str, description: str, **tokens: object) -> ChatTemplate:
    return ChatTemplate(name=name, jinja=jinja(name), description=description, **tokens)


TEMPLATES: tuple[ChatTemplate, ...] = (
    _template("qwen2.5", "Qwen2.5 Instruct: ChatML with the default Qwen system prompt",
              eos_token="<|im_end|>", pad_token="<|endoftext|>", stop_tokens=("<|im_end|>", "<|endoftext|>")),
    _template("qwen3", "Qwen3: ChatML with thinking blocks on the turns after the last user query",
              eos_token="<|im_end|>", pad_token="<|endoftext|>", stop_tokens=("<|im_end|>", "<|endoftext|>")),
    _template("llama-3", "Llama 3 Instruct: <|start_header_id|>role<|end_header_id|> ... <|eot_id|>",
              bos_token="<|begin_of_text|>", eos_token="<|eot_id|>", stop_tokens=("<|eot_id|>", "<|end_of_text|>")),
    _template("llama-3.1", "Llama 3.1 Instruct: Llama 3 turns after a dated system block (date_string)",
              bos_token="<|begin_of_text|>", eos_token="<|eot_id|>", pad_token="<|finetune_right_pad_id|>",
              stop_tokens=_LLAMA31_STOPS),
    _template("llama-3.2", "Llama 3.2 Instruct: as 3.1, dated with date_string or the day of rendering",
              bos_token="<|begin_of_text|>", eos_token="<|eot_id|>", pad_token="<|finetune_right_pad_id|>",
              stop_tokens=_LLAMA31_STOPS),
    _template("llama-3.3", "Llama 3.3 Instruct: the Llama 3.1 template",
              bos_token="<|begin_of_text|>", eos_token="<|eot_id|>", pad_token="<|finetune_right_pad_id|>",
              stop_tokens=_LLAMA31_STOPS),
    _template("llama-2", "Llama 2 Chat: <s>[INST] <<SYS>>...<</SYS>> ... [/INST] ... </s>",
              bos_token="<s>", eos_token="</s>", stop_tokens=("</s>",)),
    _template("mistral", "Mistral Instruct v0.1-v0.3: <s> [INST] ... [/INST] ...</s>",
              bos_token="<s>", eos_token="</s>", stop_tokens=("</s>",)),
    _template("gemma", "Gemma Instruct: <start_of_turn>user|model ... <end_of_turn> (no system role)",
              bos_token="<bos>", eos_token="<eos>", pad_token="<pad>", stop_tokens=_GEMMA_STOPS),
    _template("gemma-2", "Gemma 2 Instruct: the Gemma template (no system role)",
              bos_token="<bos>", eos_token="<eos>", pad_token="<pad>", stop_tokens=_GEMMA_STOPS),
    _template("gemma-3", "Gemma 3 Instruct: Gemma turns, the system message opening the first user turn",
              bos_token="<bos>", eos_token="<eos>", pad_token="<pad>", stop_tokens=_GEMMA_STOPS),
    _template("phi-3", "Phi-3 Instruct: <|user|>\\n...<|end|>\\n<|assistant|>\\n...<|end|>",
              bos_token="<s>", eos_token="<|endoftext|>", pad_token="<|endoftext|>",
              stop_tokens=("<|end|>", "<|endoftext|>")),
    _template("phi-3.5", "Phi-3.5 Instruct: the Phi-3 layout, empty system messages dropped",
              bos_token="<s>", eos_token="<|endoftext|>", pad_token="<|endoftext|>",
              stop_tokens=("<|end|>", "<|endoftext|>")),
    _template("phi-4", "Phi-4: <|im_start|>role<|im_sep|>...<|im_end|>",
              bos_token="<|endoftext|>", eos_token="<|im_end|>", pad_token="<|dummy_85|>", stop_tokens=("<|im_end|>",)),
    _template("chatml", "ChatML: <|im_start|>role\\n...<|im_end|>", eos_token="<|im_end|>",
              stop_tokens=("<|im_end|>",)),
    _template("zephyr", "Zephyr: <|system|>, <|user|>, <|assistant|> turns, each ending with </s>",
              eos_token="</s>", stop_tokens=("</s>",)),
    _template("vicuna", "Vicuna v1.1 (FastChat): SYSTEM USER: ... ASSISTANT: ...</s> (the tokenizer's bos/eos)"),
    _template("alpaca", "Stanford Alpaca: ### Instruction:\\n...\\n\\n### Response:... (the tokenizer's bos/eos)"),
    ChatTemplate(name="tokenizer", jinja=None, description="the tokenizer's own chat_template, unchanged"),
)
