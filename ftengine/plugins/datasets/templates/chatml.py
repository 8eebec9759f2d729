"""ChatML (``<|im_start|>role ... <|im_end|>``), as in OpenHermes / Dolphin tokenizer configs and vLLM's
``examples/template_chatml.jinja``."""

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
