"""Small helpers shared by the Triton ops: interpreter detection and launch sizes."""

from __future__ import annotations

import functools
import os

import torch


def interpreting() -> bool:
    """True under ``TRITON_INTERPRET=1``, where each program instance costs ~1 ms on the CPU."""
    return os.environ.get("TRITON_INTERPRET") == "1"


@functools.cache
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def num_persistent_programs(device: torch.device, per_sm: int = 4) -> int:
    """Programs for a persistent grid: ``per_sm`` per multiprocessor on a GPU, a handful when interpreting."""
    if device.type != "cuda":
        return 4
    return per_sm * _sm_count(device.index if device.index is not None else torch.cuda.current_device())


def next_power_of_2(n: int) -> int:
    """The smallest power of two ``>= n`` (``n >= 1``)."""
    return 1 << (max(int(n), 1) - 1).bit_length()


def can_overwrite(*tensors: torch.Tensor) -> bool:
    """Whether a backward may write gradients into the storage of these saved forward inputs.

    Only intermediates qualify (never leaves, which the caller owns), each with its own storage,
    so that e.g. ``swiglu(x, x)`` is never overwritten twice. The caller bumps their version
    counters after writing, so any other autograd use of them fails loudly rather than reading
    gradients.
    """
    ptrs = {t.untyped_storage().data_ptr() for t in tensors}
    return len(ptrs) == len(tensors) and all(not t.is_leaf and t.is_contiguous() for t in tensors)


def gated_grads_may_overwrite(gate: torch.Tensor, up: torch.Tensor, g: torch.Tensor, u: torch.Tensor) -> bool:
    """Whether a gated activation's backward may write ``dgate``/``dup`` over its saved ``g``/``u``.

    ``g``/``u`` are ``gate``/``up`` made contiguous: a copy is always ours to overwrite; the
    original only under :func:`can_overwrite`; and never when both share one storage. Never under
    ``torch.compile``, which cannot look at storages and would functionalize the writes into copies
    anyway: there the gradients get buffers of their own.
    """
    if torch.compiler.is_compiling():
        return False
    ok = (g is not gate or can_overwrite(gate)) and (u is not up or can_overwrite(up))
    return ok and g.untyped_storage().data_ptr() != u.untyped_storage().data_ptr()
