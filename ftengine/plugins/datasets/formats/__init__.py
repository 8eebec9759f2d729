"""Dataset formats, one module per format; :data:`FORMATS` lists every one this plugin registers.

Each format's ``detect`` claims only its own shape, so for the canonical rows of these formats at
most one of them answers True (a ``preference`` row has a ``prompt`` too, but ``completion``
leaves it alone; a ``messages`` row of ShareGPT ``from``/``value`` turns is ``sharegpt``'s; a
``label`` makes a prompt-completion row ``unpaired_preference``; ``messages`` ending with a user
turn, or a ``prompt`` alone, is ``prompt``).
"""

from ftengine.plugins.datasets.formats.alpaca import AlpacaFormat
from ftengine.plugins.datasets.formats.completion import CompletionFormat
from ftengine.plugins.datasets.formats.messages import MessagesFormat
from ftengine.plugins.datasets.formats.preference import PreferenceFormat
from ftengine.plugins.datasets.formats.prompt import PromptFormat
from ftengine.plugins.datasets.formats.segments import SegmentsFormat
from ftengine.plugins.datasets.formats.sharegpt import ShareGPTFormat
from ftengine.plugins.datasets.formats.text import TextFormat
from ftengine.plugins.datasets.formats.unpaired import UnpairedPreferenceFormat
from ftengine.plugins.datasets.formats.vision import VisionFormat

FORMATS = (MessagesFormat(), AlpacaFormat(), ShareGPTFormat(), TextFormat(), CompletionFormat(), PreferenceFormat(),
           SegmentsFormat(), UnpairedPreferenceFormat(), PromptFormat(), VisionFormat())
