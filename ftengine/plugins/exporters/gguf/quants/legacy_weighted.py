"""Q4_0, Q4_1, Q5_0 and Q5_1 with an importance matrix: llama.cpp's weighted search per block of 32.

Without an importance matrix these types keep ggml's reference rounding (``q4_0.py``, ``legacy.py``),
as llama.cpp does. With one, each weight counts ``w = imatrix[col] * sqrt(sigma2 + x**2)`` in the fit
(``sigma2`` the mean of ``x**2`` over the whole row), and the search is llama.cpp's own, so that the
files agree with ``llama-quantize``'s byte for byte but for near ties that float summation order breaks:

* Q4_0 / Q5_0 (``x ~ d * (q - 8)`` / ``d * (q - 16)``): the nineteen grids around the one mapping the
  block's largest magnitude to the most negative level; the winner's levels and its weighted
  least-squares ``d`` are stored (:func:`fit_symmetric`).
* Q4_1 / Q5_1 (``x ~ d * q + m``): the weighted affine sweep over 37 stretched and shrunk grids, each
  with its weighted least-squares ``(d, m)``; the best grid's levels, ``d`` and ``m`` are stored
  (:func:`fit_affine`).

A finer fit is possible (refitting ``d`` after rounding it to the stored fp16, alternating levels and
scales) and lowers the weighted error per tensor, but on held-out text it measured no better than
llama.cpp's search (``benchmarks/RESULTS.md``), so these files are llama.cpp's. One deliberate
difference: a block whose importances are all zero is fitted unweighted (llama.cpp's weights would
zero a Q4_0 / Q5_0 block).
"""

from __future__ import annotations

import torch

from ftengine.plugins.exporters.gguf.quants.common import fp16_bytes
from ftengine.plugins.exporters.gguf.quants.fitting import fit_affine
from ftengine.plugins.exporters.gguf.quants.fitting import fit_symmetric
from ftengine.plugins.exporters.gguf.quants.fitting import importance_weights
from ftengine.plugins.exporters.gguf.quants.legacy import high_bits
from ftengine.plugins.exporters.gguf.quants.legacy import nibbles


def _weights(x: torch.Tensor, importance: torch.Tensor, row_length: int) -> torch.Tensor:
    """Per-weight fit weights of ``(n, 32)`` blocks that form whole rows of ``row_length``."""
    w = importance_weights(x, importance, row_length, 1.0)
    return torch.where(w.sum(dim=-1, keepdim=True) > 0, w, torch.ones_like(w))


def _symmetric(x: torch.Tensor, importance: torch.Tensor, row_length: int, nmax: int) -> tuple[torch.Tensor, ...]:
    """``d`` ``(n, 1)`` and levels ``0..2*nmax-1`` ``(n, 32)`` of ``x ~ d * (q - nmax)`` (all-zero blocks: 0s)."""
    scale, inv_grid = fit_symmetric(x, _weights(x, importance, row_length), nmax)
    inv_grid = inv_grid.unsqueeze(-1)  # (n, 1)
    q = torch.where(inv_grid == 0, torch.zeros_like(x), torch.round(inv_grid * x).clamp_(-nmax, nmax - 1) + nmax)
    return scale.unsqueeze(-1), q.to(torch.uint8)


def _affine(x: torch.Tensor, importance: torch.Tensor, row_length: int, nmax: int) -> tuple[torch.Tensor, ...]:
    """``d``, ``m`` ``(n, 1)`` and levels ``0..nmax`` ``(n, 32)`` of ``x ~ d * q + m``."""
    scale, neg_min, levels = fit_affine(x, _weights(x, importance, row_length), nmax, -0.9, 0.05, 36)
    return scale.unsqueeze(-1), -neg_min.unsqueeze(-1), levels.to(torch.uint8)


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
