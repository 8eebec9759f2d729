"""Q4_0, Q4_1, Q5_0 and Q5_1 with an importance matrix: a weighted scale search per block of 32.

Without an importance matrix these types keep ggml's reference rounding (``q4_0.py``, ``legacy.py``),
as llama.cpp does. With one, each weight counts ``w = imatrix[col] * sqrt(sigma2 + x**2)`` in the fit
(``sigma2`` the mean of ``x**2`` over the whole row), as in llama.cpp's imatrix path for these types:

* Q4_0 / Q5_0 (``x ~ d * (q - 8)`` / ``d * (q - 16)``): the nineteen grids around the one mapping the
  block's largest magnitude to the most negative level (:func:`fit_symmetric`), then a few weighted
  least-squares refinements of ``d`` (:func:`refine_symmetric`).
* Q4_1 / Q5_1 (``x ~ d * q + m``): the weighted affine sweep over stretched and shrunk grids
  (:func:`fit_affine`, 37 grids), then alternating nearest levels and the weighted least-squares
  ``(d, m)``; unlike the sweep, the refit may give ``m > 0`` (the format stores ``m`` signed).

The values are finally rounded against the fp16 ``d`` (and ``m``) the file stores, so the decoder's
weights are the nearest the stored scales allow. Blocks whose importances are all zero are fitted
unweighted. The bytes are laid out exactly as the reference quantizers lay them.
"""

from __future__ import annotations

import torch

from ftengine.plugins.exporters.gguf.quants.common import as_fp16
from ftengine.plugins.exporters.gguf.quants.common import fp16_bytes
from ftengine.plugins.exporters.gguf.quants.fitting import fit_affine
from ftengine.plugins.exporters.gguf.quants.fitting import fit_symmetric
from ftengine.plugins.exporters.gguf.quants.fitting import importance_weights
from ftengine.plugins.exporters.gguf.quants.fitting import refine_symmetric
from ftengine.plugins.exporters.gguf.quants.legacy import high_bits
from ftengine.plugins.exporters.gguf.quants.legacy import nibbles


def _weights(x: torch.Tensor, importance: torch.Tensor, row_length: int) -> torch.Tensor:
    """Per-weight fit weights of ``(n, 32)`` blocks that form whole rows of ``row_length``."""
    w = importance_weights(x, importance, row_length, 1.0)
    return torch.where(w.sum(dim=-1, keepdim=True) > 0, w, torch.ones_like(w))


def _symmetric(x: torch.Tensor, importance: torch.Tensor, row_length: int, nmax: int) -> tuple[torch.Tensor, ...]:
    """Stored fp16 ``d`` ``(n, 1)`` and levels ``0..2*nmax-1`` ``(n, 32)`` of ``x ~ d * (q - nmax)``."""
    w = _weights(x, importance, row_length)
    scale, _ = fit_symmetric(x, w, nmax)
    d = as_fp16(refine_symmetric(x, w, scale, nmax)).unsqueeze(-1)  # (n, 1)
    safe = torch.where(d == 0, torch.ones_like(d), d)
    q = torch.round(x / safe).clamp_(-nmax, nmax - 1) + nmax
    return d, q.to(torch.uint8)


def _affine(x: torch.Tensor, importance: torch.Tensor, row_length: int, nmax: int,
            iters: int = 3) -> tuple[torch.Tensor, ...]:
    """Stored fp16 ``d``, ``m`` ``(n, 1)`` and levels ``0..nmax`` ``(n, 32)`` of ``x ~ d * q + m``."""
    w = _weights(x, importance, row_length)
    scale, neg_min = fit_affine(x, w, nmax, -0.9, 0.05, 36)
    d, m = scale.unsqueeze(-1), -neg_min.unsqueeze(-1)  # (n, 1)
    sum_w = w.sum(dim=-1, keepdim=True)
    sum_x = (w * x).sum(dim=-1, keepdim=True)

    def stored_levels(d, m):
        d, m = as_fp16(d), as_fp16(m)
        safe = torch.where(d > 0, d, torch.ones_like(d))
        return d, m, torch.where(d > 0, torch.round((x - m) / safe).clamp_(0, nmax), torch.zeros_like(x))

    d, m, q = stored_levels(d, m)
    for _ in range(iters):  # levels fixed: the weighted least-squares (d, m), kept where it is a proper fit
        wl = w * q
        sum_l, sum_l2, sum_xl = wl.sum(dim=-1, keepdim=True), (wl * q).sum(dim=-1, keepdim=True), \
            (wl * x).sum(dim=-1, keepdim=True)
        det = sum_w * sum_l2 - sum_l * sum_l
        safe_det = torch.where(det > 0, det, torch.ones_like(det))
        new_d = (sum_w * sum_xl - sum_x * sum_l) / safe_det
        new_m = (sum_l2 * sum_x - sum_l * sum_xl) / safe_det
        take = (det > 0) & (new_d > 0)
        d, m, q = stored_levels(torch.where(take, new_d, d), torch.where(take, new_m, m))
    return d, m, q.to(torch.uint8)


def quantize_q4_0(x: torch.Tensor, importance: torch.Tensor, row_length: int) -> torch.Tensor:
    """``(n, 32)`` float32 blocks and their columns' importances -> ``(n, 18)`` uint8 Q4_0 blocks."""
    d, q = _symmetric(x, importance, row_length, 8)
    return torch.cat([fp16_bytes(d), nibbles(q)], dim=-1)


def quantize_q5_0(x: torch.Tensor, importance: torch.Tensor, row_length: int) -> torch.Tensor:
    """``(n, 32)`` float32 blocks and their columns' importances -> ``(n, 22)`` uint8 Q5_0 blocks."""
    d, q = _symmetric(x, importance, row_length, 16)
    return torch.cat([fp16_bytes(d), high_bits(q), nibbles(q)], dim=-1)


def quantize_q4_1(x: torch.Tensor, importance: torch.Tensor, row_length: int) -> torch.Tensor:
    """``(n, 32)`` float32 blocks and their columns' importances -> ``(n, 20)`` uint8 Q4_1 blocks."""
    d, m, q = _affine(x, importance, row_length, 15)
    return torch.cat([fp16_bytes(d), fp16_bytes(m), nibbles(q)], dim=-1)


def quantize_q5_1(x: torch.Tensor, importance: torch.Tensor, row_length: int) -> torch.Tensor:
    """``(n, 32)`` float32 blocks and their columns' importances -> ``(n, 24)`` uint8 Q5_1 blocks."""
    d, m, q = _affine(x, importance, row_length, 31)
    return torch.cat([fp16_bytes(d), fp16_bytes(m), high_bits(q), nibbles(q)], dim=-1)
