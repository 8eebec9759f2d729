"""Tiny-model tests: the reference kernels unless a test picks a backend, and one intra-op thread (at these
sizes more threads only add synchronisation: a 24x32 @ 32x64 matmul took ~0.8 ms on two busy cores against
~12 us on one)."""

import pytest
import torch


@pytest.fixture(autouse=True)
def reference_kernels_on_one_thread(monkeypatch):
    monkeypatch.setenv("FTENGINE_KERNELS", "reference")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
