"""Export formats: ``lora`` (peft adapter), ``merged`` (16-bit safetensors), ``gguf`` (llama.cpp/Ollama)."""

from ftengine.core.hookspecs import hookimpl
from ftengine.plugins.exporters.gguf.exporter import GGUFExporter
from ftengine.plugins.exporters.lora import LoRAExporter
from ftengine.plugins.exporters.merged import MergedExporter


@hookimpl
def register_exporters(register):
    register(LoRAExporter())
    register(MergedExporter())
    register(GGUFExporter())
