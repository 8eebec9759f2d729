"""Unquantized types: F32, F16 and BF16 (rounded to nearest even, as torch casts)."""

from __future__ import annotations

import numpy as np
import torch

DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


def to_bytes(tensor: torch.Tensor, type_name: str) -> np.ndarray:
    """A tensor cast to ``type_name`` (``F32``, ``F16`` or ``BF16``) as a uint8 array of its bytes.

    Args:
        tensor: any shape, any float dtype, any device.
        type_name: the GGUF type name.

    Returns:
        ``(*tensor.shape[:-1], tensor.shape[-1] * itemsize)`` uint8 array.
    """
    cast = tensor.detach().to(device="cpu", dtype=DTYPES[type_name]).contiguous()
    if cast.dim() == 0:
        cast = cast.reshape(1)
    return cast.view(torch.uint8).numpy()
