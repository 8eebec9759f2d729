"""Scale searches shared by the K-quants and the IQ4 types, vectorised over all (sub-)blocks at once.

Every search fits a grid to rows of weights ``x`` under per-weight importances ``w`` and keeps, among
a sweep of slightly stretched and shrunk grids, the weighted least-squares fit of smallest error,
following the ideas of llama.cpp's quantizers (``make_qkx2_quants``, ``make_qx_quants``,
``make_qp_quants``). Without an importance matrix ``w`` is a function of ``x`` itself (``x**2``,
``|x|``, ...); with one it is ``imatrix[col] * sqrt(sigma2 + x**2)`` (:func:`importance_weights`).
"""

from __future__ import annotations

import torch

GROUP_MAX_EPS = 1e-15


def _safe(x: torch.Tensor) -> torch.Tensor:
    """``x`` with zeros replaced by ones, for divisions whose zero case is masked afterwards."""
    return torch.where(x == 0, torch.ones_like(x), x)


def importance_weights(x: torch.Tensor, importance: torch.Tensor, group: int, sigma_scale: float) -> torch.Tensor:
    """llama.cpp's per-weight weights from an importance matrix: ``imp * sqrt(sigma2 + x**2)``.

    Args:
        x: ``(n, group * k)`` blocks of weights.
        importance: the importance of each weight's input column, same shape as ``x``.
        group: the weights ``sigma2`` is averaged over (a super-block, or the block itself).
        sigma_scale: ``sigma2 = sigma_scale * mean(x**2)`` over the group (1 or 2 by type).

    Returns:
        The weights, shape of ``x``.
    """
    grouped = x.reshape(-1, group)
    sigma2 = sigma_scale * (grouped * grouped).mean(dim=-1, keepdim=True)
    return (importance.reshape(-1, group) * torch.sqrt(sigma2 + grouped * grouped)).reshape(x.shape)


def fit_affine(
    x: torch.Tensor, w: torch.Tensor, nmax: int, rmin: float, rdelta: float, nstep: int, use_mad: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Weighted affine fit ``x ~ scale * l - neg_min`` with levels ``l`` in ``0..nmax`` per row.

    Starting from the min-max grid, ``nstep + 1`` grids mapping the row's range onto
    ``nmax + rmin + rdelta * i`` levels are tried; each assigns levels and solves the weighted
    least-squares ``(scale, offset)``, the offset kept non-positive as the formats store ``-offset``
    unsigned. Each grid is laid from the best offset found so far, so the sweep walks the offset too.

    Args:
        x: ``(n, m)`` rows (sub-blocks).
        w: ``(n, m)`` non-negative weights.
        nmax: the largest level.
        rmin, rdelta, nstep: the grids tried.
        use_mad: minimise the weighted absolute error instead of the squared one (Q2_K).

    Returns:
        ``(scale, neg_min, levels)``: ``(n,)`` each with ``neg_min >= 0``, and the winning grid's levels
        ``(n, m)`` (those the least-squares ``scale`` and offset were solved for).
    """
    hi = x.amax(dim=-1, keepdim=True)  # (n, 1)
    lo = x.amin(dim=-1, keepdim=True).clamp(max=0)
    flat = hi <= lo
    sum_w = w.sum(dim=-1, keepdim=True)
    wx = w * x
    sum_x = wx.sum(dim=-1, keepdim=True)
    sum_x2 = (wx * x).sum(dim=-1, keepdim=True)
    ones = torch.ones_like(lo)

    def error(scale, offset, levels, sum_l, sum_l2, sum_xl):
        if use_mad:
            return (w * (scale * levels + offset - x).abs()).sum(dim=-1, keepdim=True)
        # sum w * (scale * l + offset - x)^2, expanded so the levels are read only once.
        return (scale * scale * sum_l2 + 2 * scale * offset * sum_l - 2 * scale * sum_xl
                + offset * offset * sum_w - 2 * offset * sum_x + sum_x2)

    def assign(levels_in_range, offset):
        span = hi - offset
        span = torch.where(span > 0, span, ones)
        levels = torch.round_((x - offset).mul_(levels_in_range / span)).clamp_(0, nmax)
        wl = w * levels
        return (levels, wl.sum(dim=-1, keepdim=True), torch.linalg.vecdot(wl, levels).unsqueeze(-1),
                torch.linalg.vecdot(wl, x).unsqueeze(-1))

    best_scale = torch.where(flat, ones, hi - lo) / nmax
    best_min = lo
    best_levels, *sums = assign(float(nmax), lo)
    best_err = error(best_scale, best_min, best_levels, *sums)
    for i in range(nstep + 1):
        levels, sum_l, sum_l2, sum_xl = assign(rmin + rdelta * i + nmax, best_min)
        det = sum_w * sum_l2 - sum_l * sum_l
        safe_det = torch.where(det > 0, det, ones)
        scale = (sum_w * sum_xl - sum_x * sum_l) / safe_det
        offset = (sum_l2 * sum_x - sum_l * sum_xl) / safe_det
        positive = offset > 0  # the format needs offset <= 0: refit the scale through the origin
        scale = torch.where(positive, sum_xl / torch.where(sum_l2 > 0, sum_l2, ones), scale)
        offset = torch.where(positive, torch.zeros_like(offset), offset)
        err = error(scale, offset, levels, sum_l, sum_l2, sum_xl)
        better = (det > 0) & (err < best_err)
        best_err = torch.where(better, err, best_err)
        best_scale = torch.where(better, scale, best_scale)
        best_min = torch.where(better, offset, best_min)
        best_levels = torch.where(better, levels, best_levels)
    best_scale = torch.where(flat, torch.zeros_like(best_scale), best_scale)
    best_min = torch.where(flat, lo, best_min)
    best_levels = torch.where(flat, torch.zeros_like(best_levels), best_levels)
    return best_scale.squeeze(-1), (-best_min).squeeze(-1), best_levels


def fit_symmetric(x: torch.Tensor, w: torch.Tensor, nmax: int, nsteps: int = 9) -> tuple[torch.Tensor, torch.Tensor]:
    """Weighted symmetric fit ``x ~ scale * l`` with levels ``l`` in ``-nmax..nmax-1`` per row.

    Grids map the row's largest-magnitude weight to ``-(nmax + 0.1 * i)`` for ``|i| <= nsteps``; the
    one whose least-squares scale explains the most weighted signal (``sum_lx**2 / sum_l2``) wins.

    Args:
        x: ``(n, m)`` rows.
        w: ``(n, m)`` non-negative weights.
        nmax: half the number of levels.
        nsteps: grids on each side of the plain one.

    Returns:
        ``(scale, inv_grid)``, each ``(n,)``: the least-squares scale, and the winning grid's
        inverse step, ``round(inv_grid * x)`` giving its levels (both 0 for an all-zero row).
    """
    idx = x.abs().argmax(dim=-1, keepdim=True)
    peak = torch.gather(x, -1, idx)  # (n, 1), signed
    zero = peak.abs() < GROUP_MAX_EPS
    peak = torch.where(zero, torch.ones_like(peak), peak)

    def sums(inv):
        levels = torch.round_(inv * x).clamp_(-nmax, nmax - 1)
        wl = w * levels
        return torch.linalg.vecdot(wl, x).unsqueeze(-1), torch.linalg.vecdot(wl, levels).unsqueeze(-1)

    inv_grid = -nmax / peak
    sum_lx, sum_l2 = sums(inv_grid)
    scale = torch.where(sum_l2 > 0, sum_lx / _safe(sum_l2), 0 * sum_l2)
    best = scale * sum_lx
    for step in range(-nsteps, nsteps + 1):
        if step == 0:
            continue
        inv = -(nmax + 0.1 * step) / peak
        sum_lx, sum_l2 = sums(inv)
        better = (sum_l2 > 0) & (sum_lx * sum_lx > best * sum_l2)
        candidate = sum_lx / _safe(sum_l2)
        scale = torch.where(better, candidate, scale)
        inv_grid = torch.where(better, inv, inv_grid)
        best = torch.where(better, candidate * sum_lx, best)
    scale = torch.where(zero, torch.zeros_like(scale), scale)
    inv_grid = torch.where(zero, torch.zeros_like(inv_grid), inv_grid)
    return scale.squeeze(-1), inv_grid.squeeze(-1)


def refine_symmetric(x: torch.Tensor, w: torch.Tensor, scale: torch.Tensor, nmax: int, iters: int = 4) -> torch.Tensor:
    """Alternate nearest levels and the weighted least-squares scale (Lloyd steps).

    Each step can only lower ``sum w * (x - scale * l)**2``: the least-squares scale is optimal for
    the levels, and clamped rounding gives the nearest levels for a scale.

    Args:
        x, w: ``(n, m)`` rows and weights.
        scale: ``(n,)`` starting scales (rows at 0 stay at 0).
        nmax: levels are in ``-nmax..nmax-1``.
        iters: steps.

    Returns:
        ``(n,)`` refined scales.
    """
    scale = scale.unsqueeze(-1)
    for _ in range(iters):
        levels = torch.round(x / _safe(scale)).clamp_(-nmax, nmax - 1)
        wl = w * levels
        sum_lx = torch.linalg.vecdot(wl, x).unsqueeze(-1)
        sum_l2 = torch.linalg.vecdot(wl, levels).unsqueeze(-1)
        scale = torch.where((scale != 0) & (sum_l2 > 0), sum_lx / _safe(sum_l2), scale)
    return scale.squeeze(-1)


def fit_symmetric_greedy(x: torch.Tensor, w: torch.Tensor, nmax: int, passes: int = 5) -> torch.Tensor:
    """Symmetric fit from the plain grid, improved one level at a time (llama.cpp's ``make_q3_quants``).

    Levels start on the grid mapping the largest-magnitude weight to ``-nmax``; each pass visits the
    positions in order and moves a level to the one the least-squares scale of the others asks for
    when that raises the explained signal ``sum_lx**2 / sum_l2``. Vectorised over the rows; the
    loop runs over the ``m`` positions of a row.

    Args:
        x, w: ``(n, m)`` rows and weights.
        nmax: levels are in ``-nmax..nmax-1``.
        passes: sweeps over the positions.

    Returns:
        ``(n,)`` least-squares scales (0 for all-zero rows).
    """
    peak = torch.gather(x, -1, x.abs().argmax(dim=-1, keepdim=True))  # (n, 1), signed
    zero = peak.abs() < GROUP_MAX_EPS
    levels = torch.round(-nmax / _safe(peak) * x).clamp_(-nmax, nmax - 1)
    wx = w * x
    sum_lx = (wx * levels).sum(dim=-1)
    sum_l2 = (w * levels * levels).sum(dim=-1)
    # positions first, so each step reads contiguous columns
    levels, xt, wt, wxt = levels.T.contiguous(), x.T.contiguous(), w.T.contiguous(), wx.T.contiguous()
    for _ in range(passes):
        for i in range(xt.shape[0]):
            li, wi, wxi = levels[i], wt[i], wxt[i]
            rest_lx = sum_lx - wxi * li
            rest_l2 = sum_l2 - wi * li * li
            new = torch.round(xt[i] * rest_l2 / _safe(rest_lx)).clamp_(-nmax, nmax - 1)
            slx = rest_lx + wxi * new
            sl2 = rest_l2 + wi * new * new
            take = (rest_lx > 0) & (new != li) & (sl2 > 0) & (slx * slx * sum_l2 > sum_lx * sum_lx * sl2)
            levels[i] = torch.where(take, new, li)
            sum_lx = torch.where(take, slx, sum_lx)
            sum_l2 = torch.where(take, sl2, sum_l2)
    scale = torch.where(sum_l2 > 0, sum_lx / _safe(sum_l2), torch.zeros_like(sum_l2))
    return torch.where(zero.squeeze(-1), torch.zeros_like(scale), scale)


def fit_positive(x: torch.Tensor, w: torch.Tensor, nmax: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Weighted fit ``x ~ d * l`` of non-negative values with levels ``l`` in ``0..nmax`` (block scales).

    Nine grids around the one mapping the row's max to ``nmax`` are tried for the smallest weighted
    squared error; then nearest levels and the least-squares ``d`` are alternated a few times.

    Args:
        x: ``(n, m)`` non-negative values (the sub-block scales or mins of super-blocks).
        w: ``(n, m)`` weights (the sub-blocks' summed weights).
        nmax: the largest level.

    Returns:
        ``(d, levels)``: ``(n,)`` step and ``(n, m)`` integer-valued levels (all 0 for a zero row).
    """
    peak = x.amax(dim=-1, keepdim=True)
    zero = peak < GROUP_MAX_EPS
    peak = torch.where(zero, torch.ones_like(peak), peak)

    def mse(inv):
        levels = torch.round(inv * x).clamp_(max=nmax)
        return (w * (x - levels / inv) ** 2).sum(dim=-1, keepdim=True)

    best_inv = nmax / peak
    best = mse(best_inv)
    for step in range(-4, 5):
        if step == 0:
            continue
        inv = (0.1 * step + nmax) / peak
        err = mse(inv)
        better = err < best
        best = torch.where(better, err, best)
        best_inv = torch.where(better, inv, best_inv)
    levels = torch.round(best_inv * x).clamp_(0, nmax)

    def ls(levels):
        wl = w * levels
        sum_lx = torch.linalg.vecdot(wl, x).unsqueeze(-1)
        sum_l2 = torch.linalg.vecdot(wl, levels).unsqueeze(-1)
        return torch.where(sum_l2 > 0, sum_lx / _safe(sum_l2), torch.zeros_like(sum_l2))

    d = ls(levels)
    for _ in range(4):  # Lloyd steps: each can only lower the weighted error
        levels = torch.where(d > 0, torch.round(x / _safe(d)).clamp_(0, nmax), levels)
        d = ls(levels)
    d = torch.where(zero, torch.zeros_like(d), d)
    levels = torch.where(zero, torch.zeros_like(levels), levels)
    return d.squeeze(-1), levels
