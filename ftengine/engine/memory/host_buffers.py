"""Page-locked host buffers of the exact size asked for, kept for reuse.

PyTorch's pinned-memory allocator rounds every request up to a power of two. For the inputs that
offloaded checkpointing keeps in host memory that can double the host memory a long sequence
needs: a 400k-token layer input of an 8B model is 3.05 GiB and takes a 4 GiB block, and 32 such
blocks no longer fit a 128 GiB host. Requests of ``min_bytes`` and more get a buffer of their
exact size here, page-locked once (``cudaHostRegister``) and handed out again for a request of the
same size once its tensor is gone: a run of fixed-length rows registers its buffers in the first
step only. A request of a new size first releases the cached buffers of other sizes, so a run whose
lengths change does not accumulate them. Smaller requests go to PyTorch's allocator.

A new buffer that would leave less than ``HOST_RESERVE_BYTES`` of the host's available memory
raises :class:`~ftengine.core.errors.HostMemoryError` with the sizes involved, instead of
page-locking memory the machine does not have (which ends with the kernel's out-of-memory killer
and no word of why).
"""

from __future__ import annotations

import math
import mmap
import weakref
from collections.abc import Callable
from typing import Any

import torch

from ftengine.core.errors import HostMemoryError

_CUDA_HOST_REGISTER_MAPPED = 0x02
HOST_RESERVE_BYTES = 4 << 30


def _available_host_bytes() -> int:
    import psutil

    return int(psutil.virtual_memory().available)


def _cuda_register(pointer: int, size: int, mapped: bool) -> None:
    flags = _CUDA_HOST_REGISTER_MAPPED if mapped else 0
    torch.cuda.check_error(torch.cuda.cudart().cudaHostRegister(pointer, size, flags))


def _cuda_unregister(pointer: int) -> None:
    torch.cuda.check_error(torch.cuda.cudart().cudaHostUnregister(pointer))


def page_locked(nbytes: int, mapped: bool = False,
                register: Callable[[int, int, bool], None] = _cuda_register,
                unregister: Callable[[int], None] = _cuda_unregister) -> torch.Tensor:
    """``nbytes`` of page-locked host memory as a uint8 tensor, unlocked when the tensor goes.

    An anonymous mapping starts on a page, so the locked range is the tensor's whole storage
    (``is_pinned`` looks at the storage's start). ``mapped`` also maps it into the GPU's address
    space; with unified addressing the host address is then the device address.
    """
    buffer = torch.frombuffer(mmap.mmap(-1, nbytes), dtype=torch.uint8)
    pointer = buffer.data_ptr()
    register(pointer, nbytes, mapped)
    weakref.finalize(buffer, unregister, pointer).atexit = False  # at exit the CUDA context may be gone
    return buffer


class HostBuffers:
    """Exact-size page-locked host tensors for one stream's copies.

    Args:
        min_bytes: requests smaller than this use ``torch.empty(..., pin_memory=True)``.
        stream: the stream whose copies read and write the buffers; it is synchronized before a
            buffer is released, so no copy in flight loses its memory.
        register / unregister: page-lock and release a host range (CUDA's by default).
        available: the host memory still available, in bytes (psutil's by default).
    """

    def __init__(self, min_bytes: int = 256 << 20, stream: Any = None,
                 register: Callable[[int, int, bool], None] = _cuda_register,
                 unregister: Callable[[int], None] = _cuda_unregister,
                 available: Callable[[], int] = _available_host_bytes) -> None:
        self.min_bytes = min_bytes
        self.stream = stream
        self.register, self.unregister, self.available = register, unregister, available
        self.free: dict[int, list[torch.Tensor]] = {}  # exact byte size -> cached page-locked buffers

    def empty(self, shape: torch.Size | tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """An uninitialised page-locked host tensor."""
        nbytes = math.prod(shape) * dtype.itemsize
        if nbytes < max(self.min_bytes, 1):
            return torch.empty(shape, dtype=dtype, pin_memory=True)
        cached = self.free.get(nbytes)
        buffer = cached.pop() if cached else self._new(nbytes)
        tensor = buffer.view(dtype).view(shape)
        weakref.finalize(tensor, self._give_back, buffer)
        return tensor

    def _new(self, nbytes: int) -> torch.Tensor:
        self.release(keep=nbytes)
        available = self.available()
        if nbytes + HOST_RESERVE_BYTES > available:
            gib = 1 << 30
            raise HostMemoryError(
                f"offloaded checkpointing needs another {nbytes / gib:.2f} GiB of page-locked host memory for a "
                f"layer input, but the host has {available / gib:.2f} GiB available (and keeps "
                f"{HOST_RESERVE_BYTES / gib:.0f} GiB in reserve); lower max_seq_length or the micro-batch, or use "
                "gradient_checkpointing: true, which keeps the layer inputs on the GPU"
            )
        return page_locked(nbytes, register=self.register, unregister=self.unregister)

    def _give_back(self, buffer: torch.Tensor) -> None:
        self.free.setdefault(buffer.numel(), []).append(buffer)

    def release(self, keep: int | None = None) -> None:
        """Release the cached buffers (those of size ``keep`` excepted)."""
        sizes = [size for size in self.free if size != keep]
        if sizes and self.stream is not None:
            self.stream.synchronize()
        for size in sizes:
            del self.free[size]

    def cached_bytes(self) -> int:
        return sum(size * len(buffers) for size, buffers in self.free.items())
