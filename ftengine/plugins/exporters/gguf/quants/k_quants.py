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

With an importance matrix (``importance``: one weight per input column, broadcast over the rows)
the fits are weighted by ``imatrix * sqrt(sigma2 + x**2)`` as in llama.cpp (Q6_K: by the
importances alone), Q4_K/Q5_K sweep a finer grid of offsets, and their 6-bit scales and mins are
fitted by weighted least squares rather than rounded against the largest.
"""

from __future__ import annotations

import torch

from ftengine.plugins.exporters.gguf.quants.common import as_fp16
from ftengine.plugins.exporters.gguf.quants.common import fp16_bytes
from ftengine.plugins.exporters.gguf.quants.fitting import GROUP_MAX_EPS
from ftengine.plugins.exporters.gguf.quants.fitting import fit_affine
from ftengine.plugins.exporters.gguf.quants.fitting import fit_positive
from ftengine.plugins.exporters.gguf.quants.fitting import fit_symmetric
from ftengine.plugins.exporters.gguf.quants.fitting import importance_weights

QK_K = 256

TYPE_SIZES = {"Q4_K": 144, "Q5_K": 176, "Q6_K": 210}


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


def _levels_affine(x: torch.Tensor, importance: torch.Tensor | None, nmax: int, rmin: float, rdelta: float,
                   nstep: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Shared Q4_K / Q5_K path: ``(n, 256)`` -> header bytes ``(n, 16)`` and levels ``(n, 256)``.

    Without importances the sub-block scales and mins are rounded against the super-block's
    largest; with them, both the sub-block fits and the 6-bit grids of the scales and mins are
    weighted (the grids by each sub-block's summed weight), as llama.cpp does with an imatrix.
    """
    n = x.shape[0]
    sub = x.reshape(n * 8, 32)
    if importance is None:
        w = torch.sqrt((sub * sub).mean(dim=-1, keepdim=True)) + sub.abs()
        scales, mins, _ = fit_affine(sub, w, nmax, rmin, rdelta, nstep)
        scales, mins = scales.reshape(n, 8), mins.reshape(n, 8)
        max_scale = scales.amax(dim=-1, keepdim=True)  # (n, 1)
        max_min = mins.amax(dim=-1, keepdim=True)
        inv_scale = torch.where(max_scale > 0, 63 / max_scale, torch.zeros_like(max_scale))
        inv_min = torch.where(max_min > 0, 63 / max_min, torch.zeros_like(max_min))
        ls = torch.round(inv_scale * scales).clamp_(0, 63).to(torch.uint8)  # (n, 8)
        lm = torch.round(inv_min * mins).clamp_(0, 63).to(torch.uint8)
        d = max_scale / 63
        dmin = max_min / 63
    else:
        w = importance_weights(x, importance, QK_K, 2.0).reshape(n * 8, 32)
        scales, mins, _ = fit_affine(sub, w, nmax, -0.9, 0.05, 36)
        sum_w = w.sum(dim=-1).reshape(n, 8)
        d, ls = fit_positive(scales.reshape(n, 8), sum_w, 63)
        dmin, lm = fit_positive(mins.reshape(n, 8), sum_w, 63)
        d, dmin = d.unsqueeze(-1), dmin.unsqueeze(-1)
        ls, lm = ls.to(torch.uint8), lm.to(torch.uint8)
    sub_d = (as_fp16(d) * ls.float()).reshape(n, 8, 1)  # (n, 8, 1)
    sub_m = (as_fp16(dmin) * lm.float()).reshape(n, 8, 1)
    safe_d = torch.where(sub_d == 0, torch.ones_like(sub_d), sub_d)
    levels = torch.round((x.reshape(n, 8, 32) + sub_m) / safe_d).clamp_(0, nmax)
    levels = torch.where(sub_d == 0, torch.zeros_like(levels), levels).to(torch.uint8).reshape(n, 256)
    header = torch.cat([fp16_bytes(d), fp16_bytes(dmin), _pack_scales_mins(ls, lm)], dim=-1)  # (n, 16)
    return header, levels


def quantize_q4_k(x: torch.Tensor, importance: torch.Tensor | None = None) -> torch.Tensor:
    """``(n, 256)`` float32 (and optional per-weight importances) -> ``(n, 144)`` uint8 Q4_K blocks."""
    header, levels = _levels_affine(x, importance, nmax=15, rmin=-1.0, rdelta=0.1, nstep=20)
    pairs = levels.reshape(-1, 4, 2, 32)  # (n, chunk of 64, half, 32)
    qs = (pairs[:, :, 0] | (pairs[:, :, 1] << 4)).reshape(-1, 128)
    return torch.cat([header, qs], dim=-1)


def quantize_q5_k(x: torch.Tensor, importance: torch.Tensor | None = None) -> torch.Tensor:
    """``(n, 256)`` float32 (and optional per-weight importances) -> ``(n, 176)`` uint8 Q5_K blocks."""
    header, levels = _levels_affine(x, importance, nmax=31, rmin=-0.5, rdelta=0.1, nstep=15)
    pairs = levels.reshape(-1, 4, 2, 32)  # (n, chunk of 64, half, 32)
    qs = ((pairs[:, :, 0] & 0xF) | ((pairs[:, :, 1] & 0xF) << 4)).reshape(-1, 128)
    # bit 2c of qh[j] is the fifth bit of value 64c + j, bit 2c + 1 that of value 64c + 32 + j.
    high = (levels.reshape(-1, 8, 32) >> 4).to(torch.int32)  # (n, 8, 32), in order 64c + 32h
    shifts = torch.arange(8, device=x.device, dtype=torch.int32).reshape(1, 8, 1)
    qh = (high << shifts).sum(dim=1).to(torch.uint8)  # (n, 32)
    return torch.cat([header, qh, qs], dim=-1)


def quantize_q6_k(x: torch.Tensor, importance: torch.Tensor | None = None) -> torch.Tensor:
    """``(n, 256)`` float32 (and optional per-weight importances) -> ``(n, 210)`` uint8 Q6_K blocks.

    The sub-block scales are weighted by ``x**2``, or by the importances themselves (as llama.cpp
    does for Q6_K).
    """
    n = x.shape[0]
    sub = x.reshape(n * 16, 16)
    w = sub * sub if importance is None else importance.reshape(n * 16, 16)
    scales = fit_symmetric(sub, w, nmax=32)[0].reshape(n, 16)
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
