import importlib

from ftengine.core.kernels import OP_NAMES
from ftengine.core.kernels import resolve_op
from ftengine.plugins.kernels.reference import ReferenceBackend
from ftengine.plugins.kernels.triton import TritonBackend

REFERENCE_ONLY = ("quantize_nf4",)
"""Ops the reference backend runs everywhere (``quantize_nf4``: once per weight, at load, in plain torch)."""


def test_triton_backend_provides_every_op_from_its_own_module():
    backend = TritonBackend()
    for op in (op for op in OP_NAMES if op not in REFERENCE_ONLY):
        fn = getattr(backend, op)
        assert fn is getattr(importlib.import_module(f"ftengine.plugins.kernels.triton.{op}"), op)


def test_triton_backend_wins_over_reference_when_available(monkeypatch):
    monkeypatch.delenv("FTENGINE_KERNELS", raising=False)  # the suite pins the reference elsewhere
    backend = TritonBackend()
    assert backend.available()  # CUDA, or the interpreter that tests/conftest.py turns on
    for op in OP_NAMES:
        expected = "reference" if op in REFERENCE_ONLY else "triton"
        assert resolve_op(op, [ReferenceBackend(), backend])[0] == expected
