"""llama.cpp's own tensor quantizer (ggml's ``ggml_quantize_chunk`` from llama-cpp-python's library) as a fixture."""

import ctypes
from pathlib import Path

import numpy as np
import pytest
import torch
from gguf import GGML_QUANT_SIZES


@pytest.fixture(scope="session")
def ggml_quantize():
    """``(x, qtype, importance=None) -> uint8 bytes`` quantized by ggml itself (with its imatrix path when
    ``importance`` is given); skips when llama-cpp-python is not installed."""
    llama_cpp = pytest.importorskip("llama_cpp")
    library = ctypes.CDLL(str(Path(llama_cpp.__file__).parent / "lib" / "libggml-base.so"))
    chunk = library.ggml_quantize_chunk
    chunk.restype = ctypes.c_size_t
    chunk.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64,
                      ctypes.c_int64, ctypes.c_void_p]

    def quantize(x: torch.Tensor, qtype, importance: torch.Tensor | None = None) -> np.ndarray:
        source = np.ascontiguousarray(x.float().numpy())
        rows, cols = source.shape
        block, size = GGML_QUANT_SIZES[qtype]
        out = np.zeros((rows, cols // block * size), dtype=np.uint8)
        weights = None if importance is None else np.ascontiguousarray(importance.float().numpy())
        chunk(int(qtype), source.ctypes.data, out.ctypes.data, 0, rows, cols,
              None if weights is None else weights.ctypes.data)
        return out

    return quantize
