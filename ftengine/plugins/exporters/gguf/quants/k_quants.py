"""The K-quants Q4_K, Q5_K and Q6_K: super-blocks of 256 weights with quantized sub-block scales.

Layouts (llama.cpp's ``block_q4_K`` / ``block_q5_K`` / ``block_q6_K``):

* Q4_K (144 bytes): fp16 ``d``, fp16 ``dmin``, 12 bytes of 6-bit scales and mins for the eight
  sub-blocks of 32, 128 bytes of 4-bit values. A weight is ``d * sc[j] * q - dmin * m[j]``.
* Q5_K (176 bytes): as Q4_K, plus 32 bytes holding the fifth bit of every value (``qh``) before the
  128 bytes of low nibbles.
* Q6_K (210 bytes): 128 bytes of low nibbles, 64 bytes of high 2-bit pairs, 16 int8 scales (one per
  sub-block of 16), fp16 ``d``. A weight is ``d * sc[j] * (q - 32)``.

Scale search, following the idea of llama.cpp's reference quantizers (vectorised over all
sub-blocks at once instead of one sub-block at a time):

* Q4_K / Q5_K: an affine fit ``x ~ s * l + m`` per sub-block of 32, weighted by
  ``w = rms(sub-block) + |x|``. Starting from the min-max grid, a sweep over slightly stretched and
  shrunk grids assigns levels ``l`` and solves the weighted least-squares ``(s, m)`` for each,
  keeping the fit with the smallest weighted error (the offset is kept non-positive, as the
  format stores ``-m`` unsigned). As in llama.cpp, each new grid is laid from the best offset found
  so far, so the sweep walks the offset as well as the scale.
* Q6_K: a symmetric fit ``x ~ s * l`` per sub-block of 16 with ``l`` in -32..31, weighted by
  ``x**2``, sweeping nineteen grids around the one that maps the largest magnitude to -32 and
  keeping the weighted least-squares scale that explains most of the signal.

The sub-block scales (and mins) are then themselves quantized (6-bit against the super-block's
largest for Q4_K/Q5_K, int8 for Q6_K), and the values are re-assigned against the stored scales.
"""

from __future__ import annotations

import torch

from ftengine.plugins.exporters.gguf.quants.common import as_fp16
from ftengine.plugins.exporters.gguf.quants.common import fp16_bytes

QK_K = 256
GROUP_MAX_EPS = 1e-15

TYPE_SIZES = {"Q4_K": 144, "Q5_K": 176, "Q6_K": 210}


def _fit_affine(
    x: torch.Tensor, nmax: int, rmin: float, rdelta: float, nstep: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Weighted affine scale search for sub-blocks.

    Args:
        x: ``(n, 32)`` sub-blocks.
        nmax: the largest level (15 for 4 bits, 31 for 5 bits).
        rmin, rdelta, nstep: the grids tried map the sub-block's range onto
            ``nmax + rmin + rdelta * i`` levels for ``i`` in ``0..nstep``.

    Returns:
        ``(scale, neg_min)``, each ``(n,)``: ``x ~ scale * l - neg_min`` with ``neg_min >= 0``.
    """
    w = torch.sqrt((x * x).mean(dim=-1, keepdim=True)) + x.abs()  # (n, 32)
    hi = x.amax(dim=-1, keepdim=True)  # (n, 1)
    lo = x.amin(dim=-1, keepdim=True).clamp(max=0)
    flat = hi == lo
    sum_w = w.sum(dim=-1, keepdim=True)
    wx = w * x
    sum_x = wx.sum(dim=-1, keepdim=True)
    sum_x2 = (wx * x).sum(dim=-1, keepdim=True)
    ones = torch.ones_like(lo)

    def weighted_error(scale, offset, sum_l, sum_l2, sum_xl):
        # sum w * (scale * l + offset - x)^2, expanded so the levels are read only once.
        return (scale * scale * sum_l2 + 2 * scale * offset * sum_l - 2 * scale * sum_xl
                + offset * offset * sum_w - 2 * offset * sum_x + sum_x2)

    def level_sums(levels_in_range, offset):
        span = hi - offset
        span = torch.where(span > 0, span, ones)
        levels = torch.round_((x - offset).mul_(levels_in_range / span)).clamp_(0, nmax)
        wl = w * levels
        return (wl.sum(dim=-1, keepdim=True), torch.linalg.vecdot(wl, levels).unsqueeze(-1),
                torch.linalg.vecdot(wl, x).unsqueeze(-1))

    best_scale = torch.where(flat, ones, hi - lo) / nmax
    best_min = lo
    best_err = weighted_error(best_scale, best_min, *level_sums(float(nmax), lo))
    for i in range(nstep + 1):
        # Each grid spans from the best offset found so far to the sub-block's max.
        sum_l, sum_l2, sum_xl = level_sums(rmin + rdelta * i + nmax, best_min)
        det = sum_w * sum_l2 - sum_l * sum_l
        safe_det = torch.where(det > 0, det, ones)
        scale = (sum_w * sum_xl - sum_x * sum_l) / safe_det
        offset = (sum_l2 * sum_x - sum_l * sum_xl) / safe_det
        positive = offset > 0  # the format needs offset <= 0: refit the scale through the origin
        scale = torch.where(positive, sum_xl / torch.where(sum_l2 > 0, sum_l2, ones), scale)
        offset = torch.where(positive, torch.zeros_like(offset), offset)
        err = weighted_error(scale, offset, sum_l, sum_l2, sum_xl)
        better = (det > 0) & (err < best_err)
        best_err = torch.where(better, err, best_err)
        best_scale = torch.where(better, scale, best_scale)
        best_min = torch.where(better, offset, best_min)
    best_scale = torch.where(flat, torch.zeros_like(best_scale), best_scale)
    best_min = torch.where(flat, lo, best_min)
    return best_scale.squeeze(-1), (-best_min).squeeze(-1)


def _pack_scales_mins(ls: torch.Tensor, lm: torch.Tensor) -> torch.Tensor:
    """Eight 6-bit scales and eight 6-bit mins ``(n, 8)`` -> the 12-byte ``scales`` field ``(n, 12)``.

    Bytes 0-3: scales 0-3 (low 6 bits) with the top 2 bits of scales 4-7 above them;
    bytes 4-7: mins 0-3 likewise with the top bits of mins 4-7;
    bytes 8-11: low nibble = low 4 bits of scales 4-7, high nibble = low 4 bits of mins 4-7.
    """
    first = ls[:, :4] | ((ls[:, 4:] >> 4) << 6)
    second = lm[:, :4] | ((lm[:, 4:] >> 4) << 6)
    third = (ls[:, 4:] & 0xF) | ((lm[:, 4:] & 0xF) << 4)
    return torch.cat([first, second, third], dim=-1)


def _levels_affine(x: torch.Tensor, nmax: int, rmin: float, rdelta: float, nstep: int):
    """Shared Q4_K / Q5_K path: ``(n, 256)`` -> header bytes ``(n, 16)`` and levels ``(n, 256)``."""
    n = x.shape[0]
    sub = x.reshape(n * 8, 32)
    scales, mins = _fit_affine(sub, nmax, rmin, rdelta, nstep)
    scales = scales.reshape(n, 8)
    mins = mins.reshape(n, 8)
    max_scale = scales.amax(dim=-1, keepdim=True)  # (n, 1)
    max_min = mins.amax(dim=-1, keepdim=True)
    inv_scale = torch.where(max_scale > 0, 63 / max_scale, torch.zeros_like(max_scale))
    inv_min = torch.where(max_min > 0, 63 / max_min, torch.zeros_like(max_min))
    ls = torch.round(inv_scale * scales).clamp_(0, 63).to(torch.uint8)  # (n, 8)
    lm = torch.round(inv_min * mins).clamp_(0, 63).to(torch.uint8)
    d = max_scale / 63
    dmin = max_min / 63
    sub_d = (as_fp16(d) * ls.float()).reshape(n, 8, 1)  # (n, 8, 1)
    sub_m = (as_fp16(dmin) * lm.float()).reshape(n, 8, 1)
    safe_d = torch.where(sub_d == 0, torch.ones_like(sub_d), sub_d)
    levels = torch.round((x.reshape(n, 8, 32) + sub_m) / safe_d).clamp_(0, nmax)
    levels = torch.where(sub_d == 0, torch.zeros_like(levels), levels).to(torch.uint8).reshape(n, 256)
    header = torch.cat([fp16_bytes(d), fp16_bytes(dmin), _pack_scales_mins(ls, lm)], dim=-1)  # (n, 16)
    return header, levels


def quantize_q4_k(x: torch.Tensor) -> torch.Tensor:
    """``(n, 256)`` float32 -> ``(n, 144)`` uint8 Q4_K blocks."""
    header, levels = _levels_affine(x, nmax=15, rmin=-1.0, rdelta=0.1, nstep=20)
    pairs = levels.reshape(-1, 4, 2, 32)  # (n, chunk of 64, half, 32)
    qs = (pairs[:, :, 0] | (pairs[:, :, 1] << 4)).reshape(-1, 128)
    return torch.cat([header, qs], dim=-1)


def quantize_q5_k(x: torch.Tensor) -> torch.Tensor:
    """``(n, 256)`` float32 -> ``(n, 176)`` uint8 Q5_K blocks."""
    header, levels = _levels_affine(x, nmax=31, rmin=-0.5, rdelta=0.1, nstep=15)
    pairs = levels.reshape(-1, 4, 2, 32)  # (n, chunk of 64, half, 32)
    qs = ((pairs[:, :, 0] & 0xF) | ((pairs[:, :, 1] & 0xF) << 4)).reshape(-1, 128)
    # bit 2c of qh[j] is the fifth bit of value 64c + j, bit 2c + 1 that of value 64c + 32 + j.
    high = (levels.reshape(-1, 8, 32) >> 4).to(torch.int32)  # (n, 8, 32), in order 64c + 32h
    shifts = torch.arange(8, device=x.device, dtype=torch.int32).reshape(1, 8, 1)
    qh = (high << shifts).sum(dim=1).to(torch.uint8)  # (n, 32)
    return torch.cat([header, qh, qs], dim=-1)


def _fit_symmetric(x: torch.Tensor, nmax: int) -> torch.Tensor:
    """Weighted symmetric scale search for Q6_K's sub-blocks of 16.

    Args:
        x: ``(n, 16)`` sub-blocks.
        nmax: 32: levels are in ``-nmax..nmax-1``.

    Returns:
        ``(n,)`` scales (signed: the grid maps the largest-magnitude weight to ``-nmax``).
    """
    w = x * x
    idx = x.abs().argmax(dim=-1, keepdim=True)
    peak = torch.gather(x, -1, idx)  # (n, 1), signed
    zero = peak.abs() < GROUP_MAX_EPS
    peak = torch.where(zero, torch.ones_like(peak), peak)

    def sums(inv_scale):
        levels = torch.round_(inv_scale * x).clamp_(-nmax, nmax - 1)
        wl = w * levels
        return torch.linalg.vecdot(wl, x).unsqueeze(-1), torch.linalg.vecdot(wl, levels).unsqueeze(-1)

    sum_lx, sum_l2 = sums(-nmax / peak)
    scale = torch.where(sum_l2 > 0, sum_lx / torch.where(sum_l2 > 0, sum_l2, torch.ones_like(sum_l2)), 0 * sum_l2)
    best = scale * sum_lx
    for step in range(-9, 10):
        if step == 0:
            continue
        sum_lx, sum_l2 = sums(-(nmax + 0.1 * step) / peak)
        # sum_lx^2 / sum_l2 is the signal the least-squares scale explains: maximise it.
        better = (sum_l2 > 0) & (sum_lx * sum_lx > best * sum_l2)
        candidate = sum_lx / torch.where(sum_l2 > 0, sum_l2, torch.ones_like(sum_l2))
        scale = torch.where(better, candidate, scale)
        best = torch.where(better, candidate * sum_lx, best)
    return torch.where(zero, torch.zeros_like(scale), scale).squeeze(-1)


def quantize_q6_k(x: torch.Tensor) -> torch.Tensor:
    """``(n, 256)`` float32 -> ``(n, 210)`` uint8 Q6_K blocks."""
    n = x.shape[0]
    scales = _fit_symmetric(x.reshape(n * 16, 16), nmax=32).reshape(n, 16)
    idx = scales.abs().argmax(dim=-1, keepdim=True)
    max_scale = torch.gather(scales, -1, idx)  # (n, 1), signed
    empty = max_scale.abs() < GROUP_MAX_EPS
    safe_max = torch.where(empty, torch.ones_like(max_scale), max_scale)
    inv = -128 / safe_max
    d = torch.where(empty, torch.zeros_like(max_scale), 1 / inv)  # (n, 1)
    sc = torch.round(inv * scales).clamp_(-128, 127)
    sc = torch.where(empty, torch.zeros_like(sc), sc)  # (n, 16)
    sub_d = (as_fp16(d) * sc).reshape(n, 16, 1)
    safe_d = torch.where(sub_d == 0, torch.ones_like(sub_d), sub_d)
    levels = torch.round(x.reshape(n, 16, 16) / safe_d).clamp_(-32, 31) + 32
    levels = torch.where(sub_d == 0, torch.full_like(levels, 32.0), levels)
    levels = torch.where(empty.reshape(n, 1, 1), torch.zeros_like(levels), levels)
    levels = levels.to(torch.uint8).reshape(n, 2, 4, 32)  # (n, half of 128, quarter, 32)
    low = levels & 0xF
    ql = torch.cat([low[:, :, 0] | (low[:, :, 2] << 4), low[:, :, 1] | (low[:, :, 3] << 4)], dim=-1)  # (n, 2, 64)
    high = levels >> 4
    qh = high[:, :, 0] | (high[:, :, 1] << 2) | (high[:, :, 2] << 4) | (high[:, :, 3] << 6)  # (n, 2, 32)
    sc_bytes = sc.to(torch.int8).view(torch.uint8)
    return torch.cat([ql.reshape(n, 128), qh.reshape(n, 64), sc_bytes, fp16_bytes(d)], dim=-1)
