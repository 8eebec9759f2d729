"""Q4_0: blocks of 32 weights, one fp16 scale and 32 4-bit values (18 bytes).

The scale maps the weight of largest magnitude to -8 (``d = x_max / -8``); values are
``trunc(x / d + 8.5)`` clipped to 0..15. Byte ``j`` holds value ``j`` in its low nibble and value
``j + 16`` in its high nibble.
"""

from __future__ import annotations

import torch

from ftengine.plugins.exporters.gguf.quants.common import fp16_bytes

BLOCK_SIZE = 32
TYPE_SIZE = 18


def quantize_blocks(x: torch.Tensor) -> torch.Tensor:
    """``(n, 32)`` float32 -> ``(n, 18)`` uint8 Q4_0 blocks."""
    idx = x.abs().argmax(dim=-1, keepdim=True)
    d = torch.gather(x, -1, idx) / -8  # (n, 1), signed
    inv = torch.where(d == 0, torch.zeros_like(d), 1 / d)
    q = torch.trunc(x * inv + 8.5).clamp(0, 15).to(torch.uint8)  # (n, 32)
    packed = q[:, :16] | (q[:, 16:] << 4)  # (n, 16)
    return torch.cat([fp16_bytes(d), packed], dim=-1)
