"""Phi chat templates: ``phi-3``, ``phi-3.5``, ``phi-4``.

Each Jinja is Microsoft's official template, verbatim: ``microsoft/Phi-3-mini-4k-instruct``,
``microsoft/Phi-3.5-mini-instruct`` and ``microsoft/phi-4``.

Phi-3 and 3.5 end a render without a generation prompt with the eos token
(``<|endoftext|>``); Phi-3.5 drops an empty system message.
"""

from ftengine.core.types import ChatTemplate

PHI3_JINJA = (
    "{% for message in messages %}{% if message['role'] == 'system' %}"
    "{{'<|system|>\n' + message['content'] + '<|end|>\n'}}{% elif message['role'] == 'user' %}"
    "{{'<|user|>\n' + message['content'] + '<|end|>\n'}}{% elif message['role'] == 'assistant' %}"
    "{{'<|assistant|>\n' + message['content'] + '<|end|>\n'}}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% else %}{{ eos_token }}{% endif %}"
)

PHI35_JINJA = (
    "{% for message in messages %}{% if message['role'] == 'system' and message['content'] %}"
    "{{'<|system|>\n' + message['content'] + '<|end|>\n'}}{% elif message['role'] == 'user' %}"
    "{{'<|user|>\n' + message['content'] + '<|end|>\n'}}{% elif message['role'] == 'assistant' %}"
    "{{'<|assistant|>\n' + message['content'] + '<|end|>\n'}}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% else %}{{ eos_token }}{% endif %}"
)

PHI4_JINJA = (
    "{% for message in messages %}{% if (message['role'] == 'system') %}"
    "{{'<|im_start|>system<|im_sep|>' + message['content'] + '<|im_end|>'}}"
    "{% elif (message['role'] == 'user') %}"
    "{{'<|im_start|>user<|im_sep|>' + message['content'] + '<|im_end|>'}}"
    "{% elif (message['role'] == 'assistant') %}"
    "{{'<|im_start|>assistant<|im_sep|>' + message['content'] + '<|im_end|>'}}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant<|im_sep|>' }}{% endif %}"
)

PHI3 = ChatTemplate(
    name="phi-3",
    jinja=PHI3_JINJA,
    bos_token="<s>",
    eos_token="<|endoftext|>",
    pad_token="<|endoftext|>",
    stop_tokens=("<|end|>", "<|endoftext|>"),
    description="Phi-3 Instruct: <|user|>\\n...<|end|>\\n<|assistant|>\\n...<|end|>",
)

PHI35 = ChatTemplate(
    name="phi-3.5",
    jinja=PHI35_JINJA,
    bos_token="<s>",
    eos_token="<|endoftext|>",
    pad_token="<|endoftext|>",
    stop_tokens=("<|end|>", "<|endoftext|>"),
    description="Phi-3.5 Instruct: the Phi-3 layout, empty system messages dropped",
)

PHI4 = ChatTemplate(
    name="phi-4",
    jinja=PHI4_JINJA,
    bos_token="<|endoftext|>",
    eos_token="<|im_end|>",
    pad_token="<|dummy_85|>",
    stop_tokens=("<|im_end|>",),
    description="Phi-4: <|im_start|>role<|im_sep|>...<|im_end|>",
)
