"""Mistral 7B Instruct (``mistral``): ``<s> [INST] ... [/INST] ...</s>``.

The Jinja is the official template of ``mistralai/Mistral-7B-Instruct-v0.1`` (``v0.2`` and
``Mixtral-8x7B-Instruct-v0.1`` ship the same text), verbatim: an optional system message joins
the first user turn, roles must alternate. ``Mistral-7B-Instruct-v0.3``'s own template differs:
``[INST] ...[/INST]`` without the spaces, the system message joined to the *last* user turn
(which no template can do and stay prefix-consistent), and tool-call blocks.
"""

from ftengine.core.types import ChatTemplate

MISTRAL_JINJA = r"""{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content'] %}
    {%- set loop_messages = messages[1:] %}
{%- else %}
    {%- set loop_messages = messages %}
{%- endif %}

{{- bos_token }}
{%- for message in loop_messages %}
    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}
        {{- raise_exception('After the optional system message, conversation roles must alternate user/assistant/user/assistant/...') }}
    {%- endif %}
    {%- if message['role'] == 'user' %}
        {%- if loop.first and system_message is defined %}
            {{- ' [INST] ' + system_message + '\n\n' + message['content'] + ' [/INST]' }}
        {%- else %}
            {{- ' [INST] ' + message['content'] + ' [/INST]' }}
        {%- endif %}
    {%- elif message['role'] == 'assistant' %}
        {{- ' ' + message['content'] + eos_token}}
    {%- else %}
        {{- raise_exception('Only user and assistant roles are supported, with the exception of an initial optional system message!') }}
    {%- endif %}
{%- endfor %}
"""  # noqa: E501

MISTRAL = ChatTemplate(
    name="mistral",
    jinja=MISTRAL_JINJA,
    bos_token="<s>",
    eos_token="</s>",
    stop_tokens=("</s>",),
    description="Mistral Instruct v0.1-v0.3: <s> [INST] ... [/INST] ...</s>",
)
