"""Chat templates, one module per model family; :data:`TEMPLATES` lists every one this plugin registers.

Every template renders, for the same conversation, exactly what the vendor's own template renders
(the tests compare them), and each is prefix-consistent: the render of the first ``i`` messages
with ``add_generation_prompt=True`` is a prefix of the render of the first ``i + 1`` when message
``i`` is the assistant's, so assistant turns can be located by rendering prefixes.
"""

from ftengine.core.types import ChatTemplate
from ftengine.plugins.datasets.templates.alpaca import ALPACA
from ftengine.plugins.datasets.templates.chatml import CHATML
from ftengine.plugins.datasets.templates.gemma import GEMMA
from ftengine.plugins.datasets.templates.gemma import GEMMA2
from ftengine.plugins.datasets.templates.gemma import GEMMA3
from ftengine.plugins.datasets.templates.llama import LLAMA2
from ftengine.plugins.datasets.templates.llama import LLAMA3
from ftengine.plugins.datasets.templates.llama import LLAMA31
from ftengine.plugins.datasets.templates.llama import LLAMA32
from ftengine.plugins.datasets.templates.llama import LLAMA33
from ftengine.plugins.datasets.templates.mistral import MISTRAL
from ftengine.plugins.datasets.templates.phi import PHI3
from ftengine.plugins.datasets.templates.phi import PHI4
from ftengine.plugins.datasets.templates.phi import PHI35
from ftengine.plugins.datasets.templates.qwen import QWEN25
from ftengine.plugins.datasets.templates.vicuna import VICUNA
from ftengine.plugins.datasets.templates.zephyr import ZEPHYR

TOKENIZER = ChatTemplate(
    name="tokenizer",
    jinja=None,
    description="the tokenizer's own chat_template, unchanged",
)

TEMPLATES: tuple[ChatTemplate, ...] = (
    QWEN25,
    LLAMA3,
    LLAMA31,
    LLAMA32,
    LLAMA33,
    LLAMA2,
    MISTRAL,
    GEMMA,
    GEMMA2,
    GEMMA3,
    PHI3,
    PHI35,
    PHI4,
    CHATML,
    ZEPHYR,
    VICUNA,
    ALPACA,
    TOKENIZER,
)
