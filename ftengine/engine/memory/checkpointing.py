"""Gradient checkpointing of the decoder layers: ``off``, standard, ``offload`` and ``auto``.

Every mode works through the hook Hugging Face decoder layers already have
(``GradientCheckpointingLayer``: a ``gradient_checkpointing`` flag and a
``_gradient_checkpointing_func(function, *args)``), so it applies to any architecture, patched or
not, with or without peft around it.

- standard (``True`` / ``"true"``): PyTorch's non-reentrant checkpoint: a layer keeps only its
  input and recomputes its activations in the backward.
- ``"offload"``: the same, but the kept input goes to (pinned) host memory, copied asynchronously
  on a side stream in the forward, and is prefetched back one layer ahead in the backward (while
  layer ``i`` recomputes, layer ``i-1``'s input is already on its way). Inputs of 256 MiB and more
  get host buffers of their exact size (:mod:`ftengine.engine.memory.host_buffers`). On a CPU host the
  input simply stays where it is.
- ``"auto"``: checkpoint only as many layers as the activation memory needs. At the first training
  forward of each new batch size (a pre-hook on the decoder body) it estimates a layer's
  activations from the config (per token, in the model's dtype: ``6*hidden + 2*kv_dim +
  3*intermediate`` values, plus a quarter for the small tensors) and checkpoints the fewest
  leading layers that fit the budget: the given bytes, else the GPU's free memory (free on the
  device plus PyTorch's cached free blocks) minus a margin of 10% of the card and 1 GiB, else, on
  a CPU host, the available host memory.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.checkpoint import checkpoint

from ftengine.core.kernels import recomputation
from ftengine.engine.memory.host_buffers import HostBuffers

MODES = ("off", "true", "offload", "auto")
_MARGIN_FRACTION = 0.10
_MARGIN_BYTES = 1 << 30
_SMALL_TENSORS = 1.25  # LoRA intermediates, norms' statistics, masks: a quarter on top of the big ones


def decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The model's checkpointable decoder layers, in order (``GradientCheckpointingLayer`` instances)."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    return [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]


def _normalize(mode: str | bool) -> str:
    if mode is True or str(mode).lower() in ("true", "standard", "on", "1"):
        return "true"
    if mode is False or mode is None or str(mode).lower() in ("off", "false", "none", "0"):
        return "off"
    if str(mode).lower() in MODES:
        return str(mode).lower()
    raise ValueError(f"unknown gradient checkpointing mode {mode!r}; expected one of: {', '.join(MODES)} (or a bool)")


def apply_gradient_checkpointing(model: torch.nn.Module, mode: str | bool,
                                 memory_budget_bytes: int | None = None) -> str:
    """Set the gradient checkpointing of every decoder layer of ``model``.

    Args:
        model: a Hugging Face model (peft-wrapped or not) whose decoder layers are
            ``GradientCheckpointingLayer`` instances.
        mode: ``"off"`` / ``False``, ``"true"`` / ``True`` (standard, non-reentrant), ``"offload"`` or
            ``"auto"``.
        memory_budget_bytes: for ``"auto"``: the bytes the activations may take; ``None`` measures
            the device (see the module docstring).

    Returns:
        A one-line description of what was set.

    Raises:
        ValueError: an unknown mode, or a model without checkpointable decoder layers.
    """
    mode = _normalize(mode)
    layers = decoder_layers(model)
    if not layers:
        raise ValueError(f"{type(model).__name__} has no checkpointable decoder layers (GradientCheckpointingLayer)")
    if mode == "off":
        for layer in layers:
            layer.gradient_checkpointing = False
        return "off"
    standard = _standard_checkpoint
    if mode == "true":
        _set(layers, standard, len(layers))
        return f"standard (non-reentrant) on {len(layers)} layers"
    if mode == "offload":
        _set(layers, _Offloader().checkpoint, len(layers))
        where = "pinned host memory" if torch.cuda.is_available() else "place (CPU host)"
        return f"offload: {len(layers)} layers, inputs kept in {where}, prefetched a layer ahead"
    planner = _AutoPlanner(model, layers, memory_budget_bytes)
    _set(layers, standard, 0)
    # on the module that runs the layers: some transformers versions read a layer's flag before its own hooks
    _owner(model, layers[0]).register_forward_pre_hook(planner.before_decoder, with_kwargs=True)
    budget = "given" if memory_budget_bytes is not None else "measured at the first step"
    return f"auto: as many of {len(layers)} layers as needed, budget {budget}"


def release_host_buffers(model: torch.nn.Module) -> None:
    """Give back the page-locked host buffers ``offload`` mode keeps for its next step.

    Call it when training ends: after a long-sequence run they hold a layer input per layer (100 GiB
    for 400k tokens of an 8B model) that an export in the same process would otherwise run beside.
    The next training step registers them again.
    """
    for layer in decoder_layers(model):
        offloader = getattr(getattr(layer, "_gradient_checkpointing_func", None), "__self__", None)
        if isinstance(offloader, _Offloader):
            offloader.buffers.release()


def _owner(model: torch.nn.Module, layer: torch.nn.Module) -> torch.nn.Module:
    """The module whose layer list holds ``layer`` (the decoder body, e.g. ``LlamaModel``)."""
    for module in model.modules():
        for child in module.children():
            if isinstance(child, torch.nn.ModuleList) and any(item is layer for item in child):
                return module
    raise ValueError(f"no module of {type(model).__name__} holds its decoder layers in a ModuleList")


def _set(layers: list[torch.nn.Module], function: Any, count: int) -> None:
    """Checkpoint the first ``count`` layers with ``function``; the rest keep their activations."""
    for index, layer in enumerate(layers):
        layer._gradient_checkpointing_func = function
        layer.gradient_checkpointing = index < count


def _standard_checkpoint(function: Any, *args: Any) -> Any:
    """PyTorch's non-reentrant checkpoint, with the recomputation marked for the kernel ops."""
    first = [True]

    def run(*inputs: Any) -> Any:
        if first:
            first.clear()
            return function(*inputs)
        with recomputation():
            return function(*inputs)

    return checkpoint(run, *args, use_reentrant=False)


# --------------------------------------------------------------------------- offload


@dataclass(eq=False)
class _Stash:
    """One checkpointed layer's input, on the host, and its prefetched device copy."""

    host: torch.Tensor
    device: torch.device
    previous: Any = None  # weakref to the stash of the layer before (prefetched during this one's backward)
    prefetched: torch.Tensor | None = None

    stream: Any = None  # the side stream of the copy in flight, while ``prefetched`` is not fetched

    def prefetch(self, stream: Any) -> None:
        """Start copying the input back to the device on ``stream``.

        The buffer comes from the compute stream's pool, so it is free for reuse the moment the
        layer's backward drops it; a buffer of the side stream's pool used on the compute stream
        would stay reserved until the GPU caught up with the host, one layer input per layer the
        host runs ahead (eight of them in a measured Llama-8B step).
        """
        if self.prefetched is None and stream is not None:
            current = torch.cuda.current_stream(self.device)
            tensor = torch.empty(self.host.shape, dtype=self.host.dtype, device=self.device)
            stream.wait_stream(current)  # the block may still be read by queued compute work
            with torch.cuda.stream(stream):
                tensor.copy_(self.host, non_blocking=True)
            self.prefetched, self.stream = tensor, stream

    def fetch(self, stream: Any) -> torch.Tensor:
        if self.prefetched is None:
            self.prefetch(stream)
        tensor, self.prefetched = self.prefetched, None
        if tensor is None:  # CPU host: the input never left
            return self.host
        torch.cuda.current_stream(self.device).wait_stream(stream)
        self.stream = None
        return tensor

    def __del__(self) -> None:
        if self.prefetched is not None and self.stream is not None:
            # never fetched: the compute stream must not reuse the buffer before the copy into it ends
            torch.cuda.current_stream(self.device).wait_stream(self.stream)


class _Offloader:
    """The ``_gradient_checkpointing_func`` of ``offload`` mode (one per model)."""

    def __init__(self) -> None:
        self.stream = torch.cuda.Stream() if torch.cuda.is_available() else None
        self.buffers = HostBuffers(stream=self.stream)
        self.last: Any = None  # weakref to the newest stash: the next layer's predecessor
        self.copying: tuple[torch.Tensor, Any] | None = None  # the input being copied out, and its event

    def _release_copied(self) -> None:
        """Let the compute stream reuse the previous layer's input once its copy to the host is done.

        The compute stream waits for that copy's event (long finished: a layer's compute outlasts
        its input's copy) before the reference is dropped, so the block goes back to the compute
        stream's pool at once. ``record_stream`` would instead keep every block until the GPU
        caught up with the host: thirteen layer inputs at the peak of a measured Llama-8B forward.
        """
        if self.copying is not None:
            hidden, event = self.copying
            torch.cuda.current_stream(hidden.device).wait_event(event)
            self.copying = None

    def _to_host(self, hidden: torch.Tensor) -> torch.Tensor:
        if hidden.device.type != "cuda":
            return hidden.detach()
        self._release_copied()
        host = self.buffers.empty(hidden.shape, hidden.dtype)
        self.stream.wait_stream(torch.cuda.current_stream(hidden.device))
        with torch.cuda.stream(self.stream):
            host.copy_(hidden.detach(), non_blocking=True)
            event = torch.cuda.Event()
            event.record(self.stream)
        self.copying = (hidden, event)
        return host

    def checkpoint(self, function: Any, hidden: torch.Tensor, *args: Any) -> Any:
        """Non-reentrant checkpoint of ``function(hidden, *args)`` whose kept input lives on the host.

        The forward runs on the live ``hidden`` (so the graph connects to it); the recompute in the
        backward starts from the host copy brought back to the device. Saved tensors of the
        recompute match the forward's one for one, which non-reentrant checkpointing requires.
        """
        stash = _Stash(self._to_host(hidden), hidden.device, previous=self.last)
        self.last = weakref.ref(stash)
        live = [hidden]
        needs_grad = hidden.requires_grad  # the recompute must save what the forward saved

        def run(_: torch.Tensor, *rest: Any) -> Any:
            if live:  # the forward
                return function(live.pop(), *rest)
            self._release_copied()
            previous = stash.previous() if stash.previous is not None else None
            current = stash.fetch(self.stream).detach().requires_grad_(needs_grad)
            if previous is not None:
                previous.prefetch(self.stream)
            with recomputation():
                return function(current, *rest)

        return checkpoint(run, stash.host, *args, use_reentrant=False)


# --------------------------------------------------------------------------- auto


class _AutoPlanner:
    """Picks, per batch shape, how many leading layers ``auto`` mode checkpoints."""

    def __init__(self, model: torch.nn.Module, layers: list[torch.nn.Module], budget: int | None) -> None:
        self.layers = layers
        self.config = getattr(model, "config", None)
        self.budget = budget
        self.plans: dict[int, int] = {}
        self.last_plan: int | None = None

    def before_decoder(self, decoder: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        if not decoder.training:
            return
        ids = kwargs.get("input_ids", args[0] if args else None)
        embeds = kwargs.get("inputs_embeds")
        tokens = ids.numel() if ids is not None else embeds.numel() // embeds.shape[-1]
        if tokens not in self.plans:
            itemsize = decoder.get_input_embeddings().weight.element_size()  # the activations' dtype
            device = next(self.layers[0].parameters()).device  # where the activations live
            self.plans[tokens] = self.plan(tokens, itemsize, device)
        count = self.plans[tokens]
        if count != self.last_plan:
            for index, each in enumerate(self.layers):
                each.gradient_checkpointing = index < count
            self.last_plan = count

    def per_token_values(self) -> tuple[int, int]:
        """Activation values one token keeps per layer: without checkpointing, and with it (the input)."""
        text = self.config.get_text_config()
        hidden = text.hidden_size
        heads = text.num_attention_heads
        head_dim = getattr(text, "head_dim", None) or hidden // heads
        kv_dim = (getattr(text, "num_key_value_heads", None) or heads) * head_dim
        full = int((6 * hidden + 2 * kv_dim + 3 * text.intermediate_size) * _SMALL_TENSORS)
        return full, hidden

    def available(self, device: torch.device) -> int:
        if self.budget is not None:
            return self.budget
        if device.type == "cuda":
            free, total = torch.cuda.mem_get_info(device)
            cached_free = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
            self.budget = max(0, int(free + cached_free - _MARGIN_FRACTION * total - _MARGIN_BYTES))
        else:
            import psutil

            self.budget = max(0, int(psutil.virtual_memory().available - _MARGIN_BYTES))
        return self.budget

    def plan(self, tokens: int, itemsize: int, device: torch.device) -> int:
        """The fewest leading layers to checkpoint so that the activations fit the budget."""
        full, kept = (values * tokens * itemsize for values in self.per_token_values())
        budget, n = self.available(device), len(self.layers)
        for count in range(n + 1):
            if (n - count) * full + count * kept <= budget:
                return count
        return n
