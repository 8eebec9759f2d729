"""Architecture plugins: one :class:`ftengine.core.types.ModelAdapter` per family, one file each.

Each family file is data (the Hugging Face classes to patch, LoRA targets, chat template, GGUF
layout) over the shared mechanism in ``_patching`` (forwards on the kernel ops) and ``_gguf``
(llama.cpp names, layouts and metadata).
"""

from __future__ import annotations

from ftengine.core.hookspecs import hookimpl
from ftengine.plugins.models import gemma
from ftengine.plugins.models import gemma2
from ftengine.plugins.models import gemma3
from ftengine.plugins.models import llama
from ftengine.plugins.models import mistral
from ftengine.plugins.models import mixtral
from ftengine.plugins.models import mllama
from ftengine.plugins.models import phi3
from ftengine.plugins.models import qwen2
from ftengine.plugins.models import qwen2_vl
from ftengine.plugins.models import qwen3
from ftengine.plugins.models import qwen3_moe

ADAPTERS = (llama.ADAPTER, qwen2.ADAPTER, qwen3.ADAPTER, mistral.ADAPTER, phi3.ADAPTER, gemma.ADAPTER, gemma2.ADAPTER,
            gemma3.ADAPTER, qwen3_moe.ADAPTER, mixtral.ADAPTER, qwen2_vl.QWEN2_VL, qwen2_vl.QWEN2_5_VL,
            mllama.ADAPTER)


@hookimpl
def register_models(register):
    """Register the first-party architecture adapters."""
    for adapter in ADAPTERS:
        register(adapter)
