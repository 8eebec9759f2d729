"""Exact-size page-locked host buffers: registered once per size, reused after their tensor dies,
released when the size changes."""

from __future__ import annotations

import gc

import pytest
import torch

from ftengine.core.errors import HostMemoryError
from ftengine.engine.memory.host_buffers import HOST_RESERVE_BYTES
from ftengine.engine.memory.host_buffers import HostBuffers


class Registry:
    """Stands in for cudaHostRegister / cudaHostUnregister on a machine without CUDA."""

    def __init__(self) -> None:
        self.live: dict[int, int] = {}
        self.registered = 0

    def register(self, pointer: int, size: int, mapped: bool) -> None:
        assert not mapped
        assert pointer % 4096 == 0 and pointer not in self.live
        self.live[pointer] = size
        self.registered += 1

    def unregister(self, pointer: int) -> None:
        del self.live[pointer]


@pytest.fixture
def pool():
    registry = Registry()
    return HostBuffers(min_bytes=256, register=registry.register, unregister=registry.unregister,
                       available=lambda: 64 << 30), registry


def test_exact_size_and_reuse_after_the_tensor_dies(pool):
    buffers, registry = pool
    a = buffers.empty((3, 7, 11), torch.bfloat16)
    assert a.shape == (3, 7, 11) and a.dtype == torch.bfloat16 and a.is_contiguous()
    assert list(registry.live.values()) == [3 * 7 * 11 * 2]  # not rounded to 512
    a.copy_(torch.randn(3, 7, 11))
    first = a.data_ptr()
    b = buffers.empty((3, 7, 11), torch.bfloat16)  # a is alive: a second buffer
    assert b.data_ptr() != first and registry.registered == 2
    del a
    gc.collect()
    c = buffers.empty((7, 3, 11), torch.float16)  # same byte size: a's buffer again, no new registration
    assert c.data_ptr() == first and registry.registered == 2
    c.fill_(1.5)
    assert torch.equal(c.float(), torch.full((7, 3, 11), 1.5))


def test_a_new_size_releases_the_cached_buffers_of_other_sizes(pool):
    buffers, registry = pool
    a, b = buffers.empty((1000,), torch.float32), buffers.empty((1000,), torch.float32)
    del a, b
    gc.collect()
    assert buffers.cached_bytes() == 8000 and len(registry.live) == 2
    c = buffers.empty((1500,), torch.float32)
    gc.collect()
    assert buffers.cached_bytes() == 0 and list(registry.live.values()) == [6000]
    del c
    gc.collect()
    buffers.release()
    gc.collect()
    assert registry.live == {}


@pytest.mark.gpu
def test_buffers_are_page_locked_and_copies_round_trip():
    stream = torch.cuda.Stream()
    buffers = HostBuffers(min_bytes=1 << 20, stream=stream)
    source = torch.randn(3, 1000, 333, device="cuda", dtype=torch.bfloat16)  # 2 MB, not a power of two
    host = buffers.empty(source.shape, source.dtype)
    assert host.is_pinned()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        host.copy_(source, non_blocking=True)
        back = host.to("cuda", non_blocking=True)
    torch.cuda.current_stream().wait_stream(stream)
    assert torch.equal(back, source)


def test_a_buffer_the_host_cannot_hold_is_refused_with_the_sizes():
    registry = Registry()
    free = [HOST_RESERVE_BYTES + 3000]
    buffers = HostBuffers(min_bytes=256, register=registry.register, unregister=registry.unregister,
                          available=lambda: free[0])
    kept = buffers.empty((1000,), torch.uint8)  # fits the headroom
    with pytest.raises(HostMemoryError, match=r"layer input.*gradient_checkpointing: true"):
        buffers.empty((4000,), torch.uint8)
    assert registry.registered == 1
    free[0] = 64 << 30
    assert buffers.empty((4000,), torch.uint8).numel() == 4000
    del kept
