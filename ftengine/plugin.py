"""Everything a plugin author imports, in one place: ``from ftengine.plugin import ...``.

The hooks are documented in :mod:`ftengine.core.hookspecs`; the interfaces the registered objects
satisfy in :mod:`ftengine.core.types`; the kernel ops' signatures in :mod:`ftengine.core.kernels`.
The names below are the stable surface: each says in its docstring since which version it exists,
and none is removed or changed incompatibly before a major version. The building blocks
(:class:`DecoderAdapter`, :class:`PatchTable` with :func:`linear_projection` and :func:`attention_function`
for a family's own blocks, :class:`GGUFLayout`, :func:`iter_merged_tensors`)
are what the first-party plugins use themselves.

.. versionadded:: 0.1
"""

from __future__ import annotations

from ftengine.core.errors import ConfigError
from ftengine.core.errors import DataError
from ftengine.core.errors import ExportError
from ftengine.core.errors import FtengineError
from ftengine.core.errors import ModelError
from ftengine.core.errors import PluginError
from ftengine.core.hookspecs import Register
from ftengine.core.hookspecs import hookimpl
from ftengine.core.kernels import OP_NAMES
from ftengine.core.kernels import LoRAWeights
from ftengine.core.kernels import begin_forward
from ftengine.core.kernels import get_op
from ftengine.core.types import ChatTemplate
from ftengine.core.types import Command
from ftengine.core.types import DatasetFormat
from ftengine.core.types import Exporter
from ftengine.core.types import GGUFSupport
from ftengine.core.types import KernelBackend
from ftengine.core.types import Message
from ftengine.core.types import ModelAdapter
from ftengine.core.types import Reward
from ftengine.core.types import RowError
from ftengine.core.types import Sample
from ftengine.core.types import TrainerPlugin
from ftengine.core.types import TrainRequest
from ftengine.plugins.exporters.merged_tensors import iter_merged_tensors
from ftengine.plugins.models._adapter import DecoderAdapter
from ftengine.plugins.models._gguf import GGUFLayout
from ftengine.plugins.models._mmproj import MmprojLayout
from ftengine.plugins.models._patching import GetOp
from ftengine.plugins.models._patching import PatchTable
from ftengine.plugins.models._patching import attention_function
from ftengine.plugins.models._patching import linear_projection

__all__ = [
    "OP_NAMES",
    "ChatTemplate",
    "Command",
    "ConfigError",
    "DataError",
    "DatasetFormat",
    "DecoderAdapter",
    "ExportError",
    "Exporter",
    "FtengineError",
    "GGUFLayout",
    "GetOp",
    "GGUFSupport",
    "KernelBackend",
    "LoRAWeights",
    "MmprojLayout",
    "Message",
    "ModelAdapter",
    "Reward",
    "ModelError",
    "PatchTable",
    "PluginError",
    "Register",
    "RowError",
    "Sample",
    "TrainRequest",
    "TrainerPlugin",
    "attention_function",
    "begin_forward",
    "get_op",
    "hookimpl",
    "iter_merged_tensors",
    "linear_projection",
]
