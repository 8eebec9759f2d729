"""Export formats: ``lora`` (peft adapter), ``merged`` (16-bit safetensors), ``gguf`` (llama.cpp/Ollama)."""
