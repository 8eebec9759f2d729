"""The legacy block types Q4_1, Q5_0 and Q5_1: blocks of 32 weights, byte-identical to ggml's reference.

* Q4_1 (20 bytes): fp16 ``d``, fp16 ``m``, 16 bytes of 4-bit values; a weight is ``d * q + m`` with
  ``m`` the block's minimum and ``d = (max - min) / 15``.
* Q5_0 (22 bytes): fp16 ``d``, 4 bytes ``qh`` (the fifth bit of value ``j`` at bit ``j``), 16 bytes
  of low nibbles; ``d`` maps the weight of largest magnitude to -16 and a weight is ``d * (q - 16)``.
* Q5_1 (24 bytes): fp16 ``d``, fp16 ``m``, ``qh``, low nibbles; ``d = (max - min) / 31``.

Value ``j`` of a block sits in the low nibble of byte ``j`` and value ``j + 16`` in its high nibble.
Values are truncated after adding one half (ggml's ``(int8_t)(x + 0.5f)``); divisions go through
float64 so they round like ggml's float32 divisions on every device.
"""

from __future__ import annotations

import torch

from ftengine.plugins.exporters.gguf.quants.common import fp16_bytes


def _inverse(d: torch.Tensor) -> torch.Tensor:
    """``1 / d`` rounded as a float32 division, 0 where ``d`` is 0."""
    return torch.where(d == 0, torch.zeros_like(d), (1 / d.double()).float())


def nibbles(q: torch.Tensor) -> torch.Tensor:
    """``(n, 32)`` values -> ``(n, 16)`` bytes of their low four bits."""
    q = q & 0xF
    return q[:, :16] | (q[:, 16:] << 4)


def high_bits(q: torch.Tensor) -> torch.Tensor:
    """``(n, 32)`` 5-bit values -> ``(n, 4)``: a little-endian uint32 with bit 4 of value ``j`` at bit ``j``."""
    bits = ((q >> 4) & 1).to(torch.int32).reshape(-1, 4, 8)
    weights = 1 << torch.arange(8, dtype=torch.int32, device=q.device)
    return (bits * weights).sum(dim=-1).to(torch.uint8)


def _affine(x: torch.Tensor, levels: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Min-max grid: ``(d, min, q)`` with ``q = trunc((x - min) / d + 0.5)``."""
    lo = x.amin(dim=-1, keepdim=True)
    hi = x.amax(dim=-1, keepdim=True)
    d = ((hi - lo).double() / levels).float()  # (n, 1)
    q = torch.trunc((x - lo) * _inverse(d) + 0.5).clamp_(0, levels).to(torch.uint8)
    return d, lo, q


def quantize_q4_1(x: torch.Tensor) -> torch.Tensor:
    """``(n, 32)`` float32 -> ``(n, 20)`` uint8 Q4_1 blocks."""
    d, lo, q = _affine(x, 15)
    return torch.cat([fp16_bytes(d), fp16_bytes(lo), nibbles(q)], dim=-1)


def quantize_q5_0(x: torch.Tensor) -> torch.Tensor:
    """``(n, 32)`` float32 -> ``(n, 22)`` uint8 Q5_0 blocks."""
    peak = torch.gather(x, -1, x.abs().argmax(dim=-1, keepdim=True))  # (n, 1), signed
    d = (peak.double() / -16).float()
    q = torch.trunc(x * _inverse(d) + 16.5).clamp_(0, 31).to(torch.uint8)
    return torch.cat([fp16_bytes(d), high_bits(q), nibbles(q)], dim=-1)


def quantize_q5_1(x: torch.Tensor) -> torch.Tensor:
    """``(n, 32)`` float32 -> ``(n, 24)`` uint8 Q5_1 blocks."""
    d, lo, q = _affine(x, 31)
    return torch.cat([fp16_bytes(d), fp16_bytes(lo), high_bits(q), nibbles(q)], dim=-1)
