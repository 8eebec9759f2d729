"""IQ4_NL and IQ4_XS: 4-bit indices into a fixed non-uniform table of sixteen int8 levels.

Layouts (llama.cpp's ``block_iq4_nl`` / ``block_iq4_xs``):

* IQ4_NL (18 bytes per 32 weights): fp16 ``d``, 16 bytes of indices (value ``j`` in the low nibble
  of byte ``j``, value ``j + 16`` in its high nibble). A weight is ``d * TABLE[q]``.
* IQ4_XS (136 bytes per 256 weights): fp16 ``d``, uint16 ``scales_h`` (top 2 bits of each of the
  eight 6-bit sub-block scales), 4 bytes ``scales_l`` (their low nibbles, two per byte), then the
  indices of the eight sub-blocks of 32 packed as in IQ4_NL. A weight is ``d * (ls - 32) * TABLE[q]``.

Scale search per block of 32 (vectorised): weights ``x**2``, or ``imatrix * sqrt(sigma2 + x**2)``;
fifteen grids around the one mapping the block's largest magnitude to the table's end (-127), each
assigning every weight its nearest table entry and solving the weighted least-squares scale; the
scale explaining the most weighted signal wins. IQ4_XS then rounds the eight scales to 6 bits
against the largest and re-assigns the indices against the stored scales.
"""

from __future__ import annotations

import torch

from ftengine.plugins.exporters.gguf.quants.common import fp16_bytes
from ftengine.plugins.exporters.gguf.quants.fitting import GROUP_MAX_EPS
from ftengine.plugins.exporters.gguf.quants.fitting import importance_weights

TABLE = (-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113)
"""The sixteen levels of llama.cpp's ``kvalues_iq4nl``."""

NTRY = 7


def _nearest(scaled: torch.Tensor) -> torch.Tensor:
    """Index of the nearest table entry for values already divided by the scale (ties go up)."""
    table = torch.tensor(TABLE, dtype=scaled.dtype, device=scaled.device)
    midpoints = table[1:] + table[:-1]  # doubled, so the comparison with 2x is exact
    return torch.searchsorted(midpoints, (2 * scaled).contiguous(), right=True)


def _fit_blocks(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """``(n, 32)`` blocks and weights -> ``(n,)`` weighted least-squares scales (0 for zero blocks)."""
    table = torch.tensor(TABLE, dtype=x.dtype, device=x.device)
    peak = torch.gather(x, -1, x.abs().argmax(dim=-1, keepdim=True))  # (n, 1), signed
    zero = peak.abs() < GROUP_MAX_EPS
    peak = torch.where(zero, torch.ones_like(peak), peak)

    def sums(inv):
        q = table[_nearest(inv * x)]
        wq = w * q
        return torch.linalg.vecdot(wq, x).unsqueeze(-1), torch.linalg.vecdot(wq, q).unsqueeze(-1)

    sum_qx, sum_q2 = sums(TABLE[0] / -peak)  # the largest weight maps to +127, beyond the table's top
    safe_q2 = torch.where(sum_q2 > 0, sum_q2, torch.ones_like(sum_q2))
    scale = torch.where(sum_q2 > 0, sum_qx / safe_q2, torch.zeros_like(sum_q2))
    best = scale * sum_qx
    for step in range(-NTRY, NTRY + 1):
        sum_qx, sum_q2 = sums((step + TABLE[0]) / peak)
        better = (sum_q2 > 0) & (sum_qx * sum_qx > best * sum_q2)
        candidate = sum_qx / torch.where(sum_q2 > 0, sum_q2, torch.ones_like(sum_q2))
        scale = torch.where(better, candidate, scale)
        best = torch.where(better, candidate * sum_qx, best)
    return torch.where(zero, torch.zeros_like(scale), scale).squeeze(-1)


def _pack_indices(indices: torch.Tensor) -> torch.Tensor:
    """``(n, 32 * k)`` indices -> ``(n, 16 * k)`` bytes: per block of 32, value ``j`` low and ``j + 16`` high."""
    halves = indices.to(torch.uint8).reshape(indices.shape[0], -1, 2, 16)
    return (halves[:, :, 0] | (halves[:, :, 1] << 4)).reshape(indices.shape[0], -1)


def quantize_iq4_nl(x: torch.Tensor, importance: torch.Tensor | None = None) -> torch.Tensor:
    """``(n, 32)`` float32 (and optional per-weight importances) -> ``(n, 18)`` uint8 IQ4_NL blocks."""
    w = x * x if importance is None else importance_weights(x, importance, 32, 2.0)
    d = _fit_blocks(x, w).unsqueeze(-1)  # (n, 1)
    inv = torch.where(d == 0, torch.zeros_like(d), 1 / torch.where(d == 0, torch.ones_like(d), d))
    return torch.cat([fp16_bytes(d), _pack_indices(_nearest(inv * x))], dim=-1)


def quantize_iq4_xs(x: torch.Tensor, importance: torch.Tensor | None = None) -> torch.Tensor:
    """``(n, 256)`` float32 (and optional per-weight importances) -> ``(n, 136)`` uint8 IQ4_XS blocks."""
    n = x.shape[0]
    sub = x.reshape(n * 8, 32)
    w = sub * sub if importance is None else importance_weights(x, importance, 256, 2.0).reshape(n * 8, 32)
    scales = _fit_blocks(sub, w).reshape(n, 8)
    peak = torch.gather(scales, -1, scales.abs().argmax(dim=-1, keepdim=True))  # (n, 1), signed
    d = -peak / 32
    inv = torch.where(d == 0, torch.zeros_like(d), 1 / torch.where(d == 0, torch.ones_like(d), d))
    ls = torch.round(inv * scales).clamp_(-32, 31)  # (n, 8)
    sub_d = (d * ls).reshape(n, 8, 1)  # the exact step, as llama.cpp assigns the indices
    safe_sub = torch.where(sub_d == 0, torch.ones_like(sub_d), sub_d)
    inv_sub = torch.where(sub_d == 0, torch.zeros_like(sub_d), 1 / safe_sub)
    indices = _nearest(inv_sub * x.reshape(n, 8, 32)).reshape(n, 256)
    stored = (ls + 32).to(torch.int32)  # (n, 8) in 0..63
    scales_l = ((stored[:, 0::2] & 0xF) | ((stored[:, 1::2] & 0xF) << 4)).to(torch.uint8)  # (n, 4)
    shifts = 2 * torch.arange(8, device=x.device, dtype=torch.int32)
    scales_h = ((stored >> 4) << shifts).sum(dim=-1, keepdim=True)  # (n, 1), 16 bits
    scales_h = torch.cat([scales_h & 0xFF, scales_h >> 8], dim=-1).to(torch.uint8)  # little-endian
    return torch.cat([fp16_bytes(d), scales_h, scales_l, _pack_indices(indices)], dim=-1)
