"""Vicuna v1.1 (``vicuna``): ``<s>SYSTEM USER: ... ASSISTANT: ...</s>USER: ... ASSISTANT:``.

Vicuna's model repositories ship no Jinja template; its format is FastChat's ``vicuna_v1.1``
conversation (``fastchat/conversation.py``: the system text, then ``"USER: " + text + " "`` and
``"ASSISTANT: " + text + "</s>"``, a bare ``"ASSISTANT:"`` to prompt a reply), tokenized with the
tokenizer's bos in front. This Jinja renders exactly that string.
"""

from ftengine.core.types import ChatTemplate

VICUNA_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)

VICUNA_JINJA = (
    "{{ bos_token }}"
    "{%- if messages[0]['role'] == 'system' %}"
    "{%- set system_message = messages[0]['content'] %}{%- set loop_messages = messages[1:] %}"
    "{%- else %}"
    "{%- set system_message = '" + VICUNA_SYSTEM.replace("'", "\\'") + "' %}{%- set loop_messages = messages %}"
    "{%- endif %}"
    "{{- system_message + ' ' }}"
    "{%- for message in loop_messages %}"
    "{%- if message['role'] == 'user' %}{{- 'USER: ' + message['content'] + ' ' }}"
    "{%- elif message['role'] == 'assistant' %}{{- 'ASSISTANT: ' + message['content'] + eos_token }}"
    "{%- else %}{{- raise_exception('Vicuna supports only user and assistant messages after the system one') }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- 'ASSISTANT:' }}{%- endif %}"
)

VICUNA = ChatTemplate(
    name="vicuna",
    jinja=VICUNA_JINJA,
    description="Vicuna v1.1 (FastChat): SYSTEM USER: ... ASSISTANT: ...</s> (the tokenizer's bos/eos)",
)
