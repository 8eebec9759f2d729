"""Chat templates, one module per model family; :data:`TEMPLATES` lists every one this plugin registers."""

from ftengine.core.types import ChatTemplate
from ftengine.plugins.datasets.templates.chatml import CHATML

TOKENIZER = ChatTemplate(
    name="tokenizer",
    jinja=None,
    description="the tokenizer's own chat_template, unchanged",
)

TEMPLATES: tuple[ChatTemplate, ...] = (CHATML, TOKENIZER)
