"""GGUF export for llama.cpp and Ollama: quantizers, tokenizer conversion, the writer and the Modelfile."""
