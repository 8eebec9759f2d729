"""The tile list of the grouped GEMMs: tiles of rows that never straddle two experts, built on the device in
one launch (the list is rebuilt for every grouped GEMM, forward and backward, so its launches count)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ftengine.plugins.kernels.triton._utils import interpreting
from ftengine.plugins.kernels.triton._utils import next_power_of_2


@triton.jit
def _expert_tiles_kernel(offsets_ptr, out_ptr, n_experts, n_tiles, BLOCK_M: tl.constexpr, BLOCK_E: tl.constexpr,
                         BLOCK_T: tl.constexpr):
    # out[0] = expert, out[1] = first row, out[2] = end row of each tile; one program
    experts = tl.arange(0, BLOCK_E)
    ends = tl.load(offsets_ptr + experts, mask=experts < n_experts, other=0).to(tl.int64)
    starts = tl.load(offsets_ptr + experts - 1, mask=(experts > 0) & (experts < n_experts), other=0).to(tl.int64)
    ends = tl.where(experts < n_experts, ends, starts)  # no rows past the last expert
    per_expert = (ends - starts + BLOCK_M - 1) // BLOCK_M
    last_tile = tl.cumsum(per_expert, 0)  # tiles up to and including expert e
    first_tile = last_tile - per_expert
    for t0 in range(0, n_tiles, BLOCK_T):
        tiles = t0 + tl.arange(0, BLOCK_T)
        mine = (tiles[:, None] >= first_tile[None, :]) & (tiles[:, None] < last_tile[None, :])  # (T, E) one-hot
        expert = tl.sum(tl.where(mine, experts[None, :], 0), 1)
        start = tl.sum(tl.where(mine, starts[None, :] + (tiles[:, None] - first_tile[None, :]) * BLOCK_M, 0), 1)
        end = tl.sum(tl.where(mine, ends[None, :], 0), 1)  # 0 for a padding tile, as its start
        keep = tiles < n_tiles
        tl.store(out_ptr + tiles, expert.to(tl.int32), mask=keep)
        tl.store(out_ptr + n_tiles + tiles, start.to(tl.int32), mask=keep)
        tl.store(out_ptr + 2 * n_tiles + tiles, end.to(tl.int32), mask=keep)


def expert_tiles(offsets: torch.Tensor, n_rows: int, block_m: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per tile of ``block_m`` rows of one expert: its expert, first row and end row (int32, on the device).

    Args:
        offsets: ``(E,)``, the running row count after each expert.
        n_rows: the rows in all (``offsets[-1]``, known to the caller without a read-back).

    Returns:
        ``(expert, start, end)``, each of the upper-bound length ``ceil(n_rows / block_m) + E``, so that no
        count is read back to the host; the tiles past the real ones are empty (``start == end``).
    """
    n_experts = offsets.shape[0]
    n_tiles = triton.cdiv(n_rows, block_m) + n_experts
    out = torch.empty(3, n_tiles, dtype=torch.int32, device=offsets.device)
    _expert_tiles_kernel[(1,)](offsets, out, n_experts, n_tiles, BLOCK_M=block_m,
                               BLOCK_E=max(16, next_power_of_2(n_experts)), BLOCK_T=16 if interpreting() else 64)
    return out[0], out[1], out[2]
