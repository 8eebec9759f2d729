"""Q8_0: blocks of 32 weights, one fp16 scale and 32 int8 values (34 bytes).

``d = max|x| / 127``, ``q = round(x / d)`` with halves away from zero, as ggml's reference
quantizer does, so the bytes equal ``gguf.quants.quantize``'s.
"""

from __future__ import annotations

import torch

from ftengine.plugins.exporters.gguf.quants.common import fp16_bytes
from ftengine.plugins.exporters.gguf.quants.common import round_half_away

BLOCK_SIZE = 32
TYPE_SIZE = 34


def quantize_blocks(x: torch.Tensor) -> torch.Tensor:
    """``(n, 32)`` float32 -> ``(n, 34)`` uint8 Q8_0 blocks.

    The two divisions go through float64 so they round like ggml's float32 divisions on every
    device: PyTorch's CPU kernel multiplies by the reciprocal of a scalar divisor, which is off by
    an ulp often enough to flip ``round(x / d)`` at halves.
    """
    d = (x.abs().amax(dim=-1, keepdim=True).double() / 127).float()  # (n, 1)
    inv = torch.where(d == 0, torch.zeros_like(d), (1 / d.double()).float())
    q = round_half_away(x * inv).to(torch.int8).view(torch.uint8)  # (n, 32)
    return torch.cat([fp16_bytes(d), q], dim=-1)
