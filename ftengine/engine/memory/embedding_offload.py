"""A frozen input-embedding table kept in host memory (``model.offload_embedding``).

The token embedding of an 8B model is a GiB of GPU memory (Llama-3.1: 128256 x 4096 in bf16) of
which a LoRA or QLoRA step reads only the rows of its tokens. Here the table moves to page-locked
host memory mapped into the GPU's address space, and the parameter becomes a CUDA tensor over that
mapping: the embedding's own CUDA kernel gathers the rows it needs across PCIe (64 MiB for 8192
tokens of Llama-3.1-8B, a few milliseconds), with no host synchronisation and no change to the
module. ``model.device``, ``model.to("cuda")``, ``state_dict`` and exports see a CUDA parameter as
before; the caching allocator does not count it, since it holds no GPU memory.

It needs a frozen table (not in ``modules_to_save``, not full fine-tuning), not tied to the LM
head (the head reads the whole matrix for every token, so it stays on the GPU anyway), and a
model on one device. A later dtype cast (``model.to(torch.float32)``) makes an ordinary GPU copy.
"""

from __future__ import annotations

import weakref

import torch

from ftengine.engine.memory.host_buffers import page_locked

_INTEGER_TYPESTR = {1: "|u1", 2: "<i2", 4: "<i4", 8: "<i8"}  # the array interface has no bfloat16


def offload_input_embedding(model: torch.nn.Module) -> str:
    """Move ``model``'s frozen input embedding to device-mapped host memory.

    Args:
        model: a Hugging Face causal LM (peft-wrapped or not) whose embedding is already frozen.

    Returns:
        A one-line description of what was done.

    Raises:
        ValueError: the embedding is trainable, tied to the LM head, or the model spans devices.
    """
    embedding = model.get_input_embeddings()
    weight = embedding.weight
    if is_in_host_memory(weight):
        return "input embedding: in host memory"
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
    if weight.device.type != "cuda":
        return f"input embedding: nothing to offload (the model is on {weight.device.type})"
    weight.data = mapped_host_copy(weight.data)
    size = weight.numel() * weight.element_size()
    return f"input embedding: {size / 2**30:.2f} GiB in host memory, read by the GPU where it lies"


_LIVE: weakref.WeakValueDictionary[int, _MappedHost] = weakref.WeakValueDictionary()
"""Device address -> the live mappings made by :func:`mapped_host_copy`."""


class _MappedHost:
    """Page-locked host memory mapped for the GPU, exposed through the CUDA array interface.

    The CUDA tensor made from it holds it (its storage's deleter); when that storage goes, so does
    the page-locked memory.
    """

    def __init__(self, like: torch.Tensor) -> None:
        self.host = page_locked(like.numel() * like.element_size(), mapped=True)
        self.host.view(like.dtype).view(like.shape).copy_(like)
        pointer = self.host.data_ptr()
        _LIVE[pointer] = self
        self.__cuda_array_interface__ = {
            "shape": tuple(like.shape), "typestr": _INTEGER_TYPESTR[like.element_size()],
            "data": (pointer, False), "version": 3, "strides": None,
        }


def mapped_host_copy(tensor: torch.Tensor) -> torch.Tensor:
    """A CUDA tensor equal to the CUDA ``tensor`` whose memory is page-locked host memory mapped into
    the GPU's address space (unified addressing: the host address is the device address)."""
    return torch.as_tensor(_MappedHost(tensor.contiguous()), device=tensor.device).view(tensor.dtype)


def is_in_host_memory(tensor: torch.Tensor) -> bool:
    """Whether ``tensor`` is a CUDA tensor over host memory made by :func:`mapped_host_copy`."""
    return tensor.is_cuda and tensor.untyped_storage().data_ptr() in _LIVE
