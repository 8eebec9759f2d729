"""Gemma chat templates: ``gemma``, ``gemma-2``, ``gemma-3``.

Each Jinja is Google's official template, verbatim: ``google/gemma-7b-it`` (Gemma 2's
``google/gemma-2-2b-it`` ships the same text) and ``google/gemma-3-1b-it``.

Gemma 1 and 2 have no system role: their templates raise "System role not supported" for a
conversation that starts with a system message, as the official ones do. Gemma 3 puts the system
message at the top of the first user turn.
"""

from ftengine.core.types import ChatTemplate

GEMMA_JINJA = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}"
    "{{ raise_exception('System role not supported') }}{% endif %}{% for message in messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{% endif %}{% if (message['role'] == 'assistant') %}{% set role = 'model' %}{% else %}"
    "{% set role = message['role'] %}{% endif %}"
    "{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{'<start_of_turn>model\n'}}{% endif %}"
)

GEMMA3_JINJA = r"""{{ bos_token }}
{%- if messages[0]['role'] == 'system' -%}
    {%- if messages[0]['content'] is string -%}
        {%- set first_user_prefix = messages[0]['content'] + '

' -%}
    {%- else -%}
        {%- set first_user_prefix = messages[0]['content'][0]['text'] + '

' -%}
    {%- endif -%}
    {%- set loop_messages = messages[1:] -%}
{%- else -%}
    {%- set first_user_prefix = "" -%}
    {%- set loop_messages = messages -%}
{%- endif -%}
{%- for message in loop_messages -%}
    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}
        {{ raise_exception("Conversation roles must alternate user/assistant/user/assistant/...") }}
    {%- endif -%}
    {%- if (message['role'] == 'assistant') -%}
        {%- set role = "model" -%}
    {%- else -%}
        {%- set role = message['role'] -%}
    {%- endif -%}
    {{ '<start_of_turn>' + role + '
' + (first_user_prefix if loop.first else "") }}
    {%- if message['content'] is string -%}
        {{ message['content'] | trim }}
    {%- elif message['content'] is iterable -%}
        {%- for item in message['content'] -%}
            {%- if item['type'] == 'image' -%}
                {{ '<start_of_image>' }}
            {%- elif item['type'] == 'text' -%}
                {{ item['text'] | trim }}
            {%- endif -%}
        {%- endfor -%}
    {%- else -%}
        {{ raise_exception("Invalid content type") }}
    {%- endif -%}
    {{ '<end_of_turn>
' }}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{'<start_of_turn>model
'}}
{%- endif -%}
"""

_GEMMA_STOPS = ("<end_of_turn>", "<eos>")

GEMMA = ChatTemplate(
    name="gemma",
    jinja=GEMMA_JINJA,
    bos_token="<bos>",
    eos_token="<eos>",
    pad_token="<pad>",
    stop_tokens=_GEMMA_STOPS,
    description="Gemma Instruct: <start_of_turn>user|model ... <end_of_turn> (no system role)",
)

GEMMA2 = ChatTemplate(
    name="gemma-2",
    jinja=GEMMA_JINJA,
    bos_token="<bos>",
    eos_token="<eos>",
    pad_token="<pad>",
    stop_tokens=_GEMMA_STOPS,
    description="Gemma 2 Instruct: the Gemma template (no system role)",
)

GEMMA3 = ChatTemplate(
    name="gemma-3",
    jinja=GEMMA3_JINJA,
    bos_token="<bos>",
    eos_token="<eos>",
    pad_token="<pad>",
    stop_tokens=_GEMMA_STOPS,
    description="Gemma 3 Instruct: Gemma turns, the system message opening the first user turn",
)
