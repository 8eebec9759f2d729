"""Dataset formats, one module per format; :data:`FORMATS` lists every one this plugin registers."""

from ftengine.plugins.datasets.formats.alpaca import AlpacaFormat
from ftengine.plugins.datasets.formats.messages import MessagesFormat

FORMATS = (MessagesFormat(), AlpacaFormat())
