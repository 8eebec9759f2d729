"""ChatML (``chatml``): ``<|im_start|>role\\n...<|im_end|>\\n`` for every message.

Renders what the plain ChatML template renders (``Snowflake/snowflake-arctic-instruct``'s, for one):
no bos, every turn closed with ``<|im_end|>``.
"""

from ftengine.core.types import ChatTemplate

CHATML_JINJA = (
    "{% for message in messages %}"
    "{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

CHATML = ChatTemplate(
    name="chatml",
    jinja=CHATML_JINJA,
    eos_token="<|im_end|>",
    stop_tokens=("<|im_end|>",),
    description="ChatML: <|im_start|>role\\n...<|im_end|>",
)
