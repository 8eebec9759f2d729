"""Alpaca (``alpaca``): Stanford Alpaca's instruction prompt, one ``### Instruction:`` block per user turn.

Stanford Alpaca ships no Jinja template; its training format is ``PROMPT_DICT["prompt_no_input"]``
in ``tatsu-lab/stanford_alpaca/train.py`` followed by the output and the eos token, tokenized with
the tokenizer's bos in front::

    Below is an instruction that describes a task. Write a response that appropriately completes
    the request.\\n\\n### Instruction:\\n{instruction}\\n\\n### Response:{output}</s>

This Jinja renders exactly that for one exchange. A system message replaces the opening
sentence; later exchanges follow after a blank line.
"""

from ftengine.core.types import ChatTemplate

ALPACA_SYSTEM = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request."
)

ALPACA_JINJA = (
    "{{ bos_token }}"
    "{%- if messages[0]['role'] == 'system' %}"
    "{%- set system_message = messages[0]['content'] %}{%- set loop_messages = messages[1:] %}"
    "{%- else %}"
    "{%- set system_message = '" + ALPACA_SYSTEM + "' %}{%- set loop_messages = messages %}"
    "{%- endif %}"
    "{{- system_message + '\\n\\n' }}"
    "{%- for message in loop_messages %}"
    "{%- if message['role'] == 'user' %}"
    "{{- ('' if loop.first else '\\n\\n') + '### Instruction:\\n' + message['content'] + '\\n\\n### Response:' }}"
    "{%- elif message['role'] == 'assistant' %}{{- message['content'] + eos_token }}"
    "{%- else %}{{- raise_exception('Alpaca supports only user and assistant messages after the system one') }}"
    "{%- endif %}"
    "{%- endfor %}"
)

ALPACA = ChatTemplate(
    name="alpaca",
    jinja=ALPACA_JINJA,
    description="Stanford Alpaca: ### Instruction:\\n...\\n\\n### Response:... (the tokenizer's bos/eos)",
)
