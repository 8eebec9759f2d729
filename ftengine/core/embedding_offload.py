"""A frozen input-embedding table kept in host memory (``model.offload_embedding``).

The token embedding of an 8B model is a GiB of GPU memory (Llama-3.1: 128256 x 4096 in bf16) of
which a LoRA or QLoRA step reads only the rows of its tokens. With the table in host memory the
lookup runs on the host and only the gathered rows (tokens x hidden) cross to the GPU, a few
milliseconds a step against a step of a second or more. The table is not page-locked: no copy
reads it, and page-locked memory is better spent on offloaded checkpoints.

It needs a frozen table (not in ``modules_to_save``, not full fine-tuning), not tied to the LM
head (the head reads the whole matrix for every token, so it stays on the GPU anyway), and a
model on one device.

Two details keep it in place:

- The table ignores device and dtype moves (its module's ``_apply`` is replaced): transformers'
  Trainer and accelerate call ``model.to(device)`` on a 16-bit model, which would otherwise bring
  it back.
- The embedding module moves to the end of its parent's children, because transformers'
  ``model.device`` is the device of the first parameter, which would otherwise be the host table.
"""

from __future__ import annotations

import types
from typing import Any

import torch

OFFLOADED_ATTR = "ftengine_offloaded_to_host"
"""Set on an offloaded embedding module: the device its looked-up rows are sent to."""

HOST = torch.device("cpu")


def offload_input_embedding(model: torch.nn.Module) -> str:
    """Move ``model``'s frozen input embedding to host memory; look tokens up there.

    Args:
        model: a Hugging Face causal LM (peft-wrapped or not) whose embedding is already frozen.

    Returns:
        A one-line description of what was done.

    Raises:
        ValueError: the embedding is trainable, tied to the LM head, or the model spans devices.
    """
    embedding = model.get_input_embeddings()
    if getattr(embedding, OFFLOADED_ATTR, None) is not None:
        return "input embedding: in host memory"
    weight = embedding.weight
    if weight.requires_grad:
        raise ValueError("model.offload_embedding: the input embedding is trained (full fine-tuning or "
                         "lora.modules_to_save); only a frozen embedding can live in host memory")
    output = model.get_output_embeddings()
    if output is not None and getattr(output, "weight", None) is not None and \
            output.weight.data_ptr() == weight.data_ptr():
        raise ValueError("model.offload_embedding: the input embedding is tied to the LM head, which needs the "
                         "whole matrix on the GPU; set offload_embedding: false for this model")
    devices = set(map(str, (getattr(model, "hf_device_map", None) or {}).values()))
    if len(devices) > 1:
        raise ValueError(f"model.offload_embedding: the model is spread over devices {sorted(devices)}; offloading "
                         "the embedding needs a model on one device")
    if weight.device.type == "cpu":
        return "input embedding: nothing to offload (the model is in host memory)"
    size = sum(t.numel() * t.element_size() for t in embedding.state_dict().values())
    keep_on_host(model, embedding, weight.device)
    return f"input embedding: {size / 2**30:.2f} GiB in host memory, looked up there"


def keep_on_host(model: torch.nn.Module, embedding: torch.nn.Module, device: torch.device) -> None:
    """Put ``embedding``'s tensors in host memory and send every lookup's rows to ``device``."""
    embedding.to(HOST)
    lookup = embedding.forward

    def forward(input_ids: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return lookup(input_ids.to(HOST), *args, **kwargs).to(device)

    embedding.forward = forward
    embedding._apply = types.MethodType(_stay, embedding)
    setattr(embedding, OFFLOADED_ATTR, device)
    _move_to_last(model, embedding)


def _stay(module: torch.nn.Module, fn: Any, recurse: bool = True) -> torch.nn.Module:
    """``_apply`` of an offloaded embedding: device and dtype moves leave it as it is."""
    return module


def _move_to_last(model: torch.nn.Module, embedding: torch.nn.Module) -> None:
    for parent in model.modules():
        for name, child in list(parent._modules.items()):
            if child is embedding:
                parent._modules[name] = parent._modules.pop(name)
                return
