"""Zephyr (``zephyr``): ``<|user|>\\n...</s>\\n<|assistant|>\\n...</s>``.

The Jinja is the template of ``HuggingFaceH4/zephyr-7b-beta`` (the alignment handbook's
``DEFAULT_CHAT_TEMPLATE`` it was trained with; TinyLlama Chat ships the same text), verbatim.
"""

from ftengine.core.types import ChatTemplate

ZEPHYR_JINJA = r"""{% for message in messages %}
{% if message['role'] == 'user' %}
{{ '<|user|>
' + message['content'] + eos_token }}
{% elif message['role'] == 'system' %}
{{ '<|system|>
' + message['content'] + eos_token }}
{% elif message['role'] == 'assistant' %}
{{ '<|assistant|>
'  + message['content'] + eos_token }}
{% endif %}
{% if loop.last and add_generation_prompt %}
{{ '<|assistant|>' }}
{% endif %}
{% endfor %}
"""[:-1]

ZEPHYR = ChatTemplate(
    name="zephyr",
    jinja=ZEPHYR_JINJA,
    eos_token="</s>",
    stop_tokens=("</s>",),
    description="Zephyr: <|system|>, <|user|>, <|assistant|> turns, each ending with </s>",
)
