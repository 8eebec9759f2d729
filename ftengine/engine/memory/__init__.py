"""GPU-memory machinery of a run: activation checkpointing (kept in GPU memory or offloaded to pinned
host buffers), the host buffers themselves, and the input embedding kept in CPU memory."""
