"""The run engine: the pipeline stages (load -> patch -> adapt -> data -> train -> export), data
preparation, the run directory, progress and metrics, the data preview, and ``memory/`` (activation
checkpointing, pinned host buffers, embedding offload).

The engine builds on the contract in :mod:`ftengine.core` and reaches plugins only through its
registries: it imports no module of :mod:`ftengine.plugins`.
"""
