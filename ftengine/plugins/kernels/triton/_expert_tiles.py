"""The tile list of the grouped GEMMs: tiles of rows that never straddle two experts, built on the device."""

from __future__ import annotations

import torch
import triton


def expert_tiles(offsets: torch.Tensor, n_rows: int, block_m: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per tile of ``block_m`` rows of one expert: its expert, first row and end row, on the device.

    The list has its upper-bound length ``ceil(S / block_m) + E`` (nothing read back to the host);
    the tiles past the real ones are empty (``start == end``).
    """
    n_experts = offsets.shape[0]
    ends = offsets.long()
    starts = torch.cat([ends.new_zeros(1), ends[:-1]])
    per_expert = (ends - starts + block_m - 1) // block_m  # (E,)
    last_tile = torch.cumsum(per_expert, 0)  # (E,) tiles up to and including expert e
    tile = torch.arange(triton.cdiv(n_rows, block_m) + n_experts, device=offsets.device)
    expert = torch.searchsorted(last_tile, tile, right=True)  # (T,) == E for padding tiles
    valid = expert < n_experts
    expert = expert.clamp(max=n_experts - 1)
    start = starts[expert] + (tile - (last_tile[expert] - per_expert[expert])) * block_m
    end = torch.where(valid, ends[expert], start)
    return expert.to(torch.int32), start.to(torch.int32), end.to(torch.int32)
