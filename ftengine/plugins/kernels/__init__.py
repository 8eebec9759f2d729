"""Kernel backends: ``reference`` (plain PyTorch, runs everywhere) and ``triton`` (GPU)."""
