"""The low-bit K-quants Q2_K and Q3_K: super-blocks of 256 weights in sixteen sub-blocks of 16.

Layouts (llama.cpp's ``block_q2_K`` / ``block_q3_K``):

* Q2_K (84 bytes): 16 bytes of scales (low nibble: 4-bit scale, high nibble: 4-bit min of each
  sub-block), 64 bytes of 2-bit values, fp16 ``d``, fp16 ``dmin``. A weight is
  ``d * sc[j] * q - dmin * m[j]`` with ``q`` in 0..3.
* Q3_K (110 bytes): 32 bytes ``hmask`` (the third bit of every value), 64 bytes of low 2-bit
  values, 12 bytes of 6-bit signed scales, fp16 ``d``. A weight is ``d * (sc[j] - 32) * (q - 4)``.

In both, the 2-bit values of positions ``128h + 32k + l`` share byte ``32h + l`` (bits ``2k``).

Scale search (vectorised over every sub-block at once):

* Q2_K: an affine fit per sub-block weighted by ``|x|`` minimising the weighted absolute error over
  sixteen grids, the scales and mins rounded to 4 bits against the super-block's largest; with an
  importance matrix a weighted least-squares fit over thirty-seven grids, and 4-bit grids for the
  scales and mins fitted by weighted least squares.
* Q3_K: a symmetric fit per sub-block weighted by ``x**2``, improved one level at a time from the
  plain grid, the sixteen scales rounded to 6 bits against the largest; with an importance matrix,
  weighted by ``imatrix * sqrt(sigma2 + x**2)`` over nineteen grids then alternating nearest levels
  and least-squares scale, the scales fitted on a weighted 6-bit grid of their own.
"""

from __future__ import annotations

import torch

from ftengine.plugins.exporters.gguf.quants.common import as_fp16
from ftengine.plugins.exporters.gguf.quants.common import fp16_bytes
from ftengine.plugins.exporters.gguf.quants.fitting import fit_affine
from ftengine.plugins.exporters.gguf.quants.fitting import fit_positive
from ftengine.plugins.exporters.gguf.quants.fitting import fit_symmetric
from ftengine.plugins.exporters.gguf.quants.fitting import fit_symmetric_greedy
from ftengine.plugins.exporters.gguf.quants.fitting import importance_weights
from ftengine.plugins.exporters.gguf.quants.fitting import refine_symmetric

QK_K = 256


def _pack_2bit(levels: torch.Tensor) -> torch.Tensor:
    """``(n, 256)`` values in 0..3 -> ``(n, 64)`` bytes: value ``128h + 32k + l`` at bits ``2k`` of byte ``32h + l``."""
    quarters = levels.reshape(-1, 2, 4, 32).to(torch.uint8)  # (n, half, k, l)
    packed = quarters[:, :, 0] | (quarters[:, :, 1] << 2) | (quarters[:, :, 2] << 4) | (quarters[:, :, 3] << 6)
    return packed.reshape(-1, 64)


def _round_against_max(values: torch.Tensor, levels: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Non-negative ``(n, m)`` values on a grid mapping each row's max to ``levels``: ``(step (n, 1), l (n, m))``."""
    peak = values.amax(dim=-1, keepdim=True)
    inv = torch.where(peak > 0, levels / torch.where(peak > 0, peak, torch.ones_like(peak)), torch.zeros_like(peak))
    return torch.where(peak > 0, peak / levels, torch.zeros_like(peak)), torch.round(inv * values)


def quantize_q2_k(x: torch.Tensor, importance: torch.Tensor | None = None) -> torch.Tensor:
    """``(n, 256)`` float32 (and optional per-weight importances) -> ``(n, 84)`` uint8 Q2_K blocks."""
    n = x.shape[0]
    sub = x.reshape(n * 16, 16)
    if importance is None:
        scales, mins, _ = fit_affine(sub, sub.abs(), 3, -0.5, 0.1, 15, use_mad=True)
        d, ls = _round_against_max(scales.reshape(n, 16), 15)
        dmin, lm = _round_against_max(mins.reshape(n, 16), 15)
    else:
        w = importance_weights(x, importance, QK_K, 1.0).reshape(n * 16, 16)
        scales, mins, _ = fit_affine(sub, w, 3, -0.9, 0.05, 36)
        sum_w = w.sum(dim=-1).reshape(n, 16)
        d, ls = fit_positive(scales.reshape(n, 16), sum_w, 15)
        dmin, lm = fit_positive(mins.reshape(n, 16), sum_w, 15)
        d, dmin = d.unsqueeze(-1), dmin.unsqueeze(-1)
    sub_d = (as_fp16(d) * ls).reshape(n, 16, 1)
    sub_m = (as_fp16(dmin) * lm).reshape(n, 16, 1)
    safe_d = torch.where(sub_d == 0, torch.ones_like(sub_d), sub_d)
    levels = torch.round((x.reshape(n, 16, 16) + sub_m) / safe_d).clamp_(0, 3)
    levels = torch.where(sub_d == 0, torch.zeros_like(levels), levels)
    scale_bytes = ls.to(torch.uint8) | (lm.to(torch.uint8) << 4)  # (n, 16)
    return torch.cat([scale_bytes, _pack_2bit(levels), fp16_bytes(d), fp16_bytes(dmin)], dim=-1)


def _pack_q3_scales(stored: torch.Tensor) -> torch.Tensor:
    """Sixteen 6-bit scales ``(n, 16)`` -> 12 bytes: low nibbles of scales ``j`` and ``j + 8`` in byte ``j``,
    the top 2 bits of scale ``4k + m`` at bits ``2k`` of byte ``8 + m``."""
    low = (stored[:, :8] & 0xF) | ((stored[:, 8:] & 0xF) << 4)  # (n, 8)
    high = (stored >> 4).reshape(-1, 4, 4)  # (n, k, m)
    top = high[:, 0] | (high[:, 1] << 2) | (high[:, 2] << 4) | (high[:, 3] << 6)  # (n, 4)
    return torch.cat([low, top], dim=-1)


def quantize_q3_k(x: torch.Tensor, importance: torch.Tensor | None = None) -> torch.Tensor:
    """``(n, 256)`` float32 (and optional per-weight importances) -> ``(n, 110)`` uint8 Q3_K blocks."""
    n = x.shape[0]
    sub = x.reshape(n * 16, 16)
    if importance is None:
        scales = fit_symmetric_greedy(sub, sub * sub, 4).reshape(n, 16)
        peak = torch.gather(scales, -1, scales.abs().argmax(dim=-1, keepdim=True))  # (n, 1), signed
        empty = peak == 0
        inv = torch.where(empty, torch.zeros_like(peak), -32 / torch.where(empty, torch.ones_like(peak), peak))
        d = torch.where(empty, torch.zeros_like(peak), 1 / torch.where(empty, torch.ones_like(inv), inv))
    else:
        w = importance_weights(x, importance, QK_K, 2.0).reshape(n * 16, 16)
        scales = refine_symmetric(sub, w, fit_symmetric(sub, w, 4)[0], 4).reshape(n, 16)
        d, inv = fit_symmetric(scales, w.sum(dim=-1).reshape(n, 16), 32)
        d, inv = d.unsqueeze(-1), inv.unsqueeze(-1)
        empty = d == 0
    sc = torch.round(inv * scales).clamp_(-32, 31)  # (n, 16)
    stored = torch.where(empty, torch.zeros_like(sc), sc + 32).to(torch.uint8)
    sub_d = (as_fp16(d) * (stored.float() - 32)).reshape(n, 16, 1)
    safe_d = torch.where(sub_d == 0, torch.ones_like(sub_d), sub_d)
    levels = torch.round(x.reshape(n, 16, 16) / safe_d).clamp_(-4, 3) + 4
    levels = torch.where(sub_d == 0, torch.full_like(levels, 4.0), levels).to(torch.uint8).reshape(n, 8, 32)
    hmask = torch.zeros(n, 32, dtype=torch.uint8, device=x.device)
    for bit in range(8):  # the third bit of value 32 * bit + m is bit ``bit`` of hmask[m]
        hmask |= (levels[:, bit] >> 2) << bit
    return torch.cat([hmask, _pack_2bit(levels & 3), _pack_q3_scales(stored), fp16_bytes(d)], dim=-1)
