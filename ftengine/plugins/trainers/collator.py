"""Batching of pre-tokenized samples: right-padding to the longest row of the batch."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch


def long_tensor(values: Any) -> torch.Tensor:
    """``values`` (a row's list of ids, as ``datasets`` yields it) as an int64 tensor. Through numpy: it turns a
    Python list into an array several times faster than ``torch.as_tensor`` walks it, and the collator runs on
    the host between steps, while the GPU waits for the next batch."""
    if isinstance(values, torch.Tensor):
        return values.to(torch.long)
    return torch.from_numpy(np.asarray(values, dtype=np.int64))


class PadCollator:
    """Pads ``input_ids`` with the pad id and ``labels`` with -100.

    Unpacked rows get an ``attention_mask`` (1 on tokens, 0 on padding). Packed rows (those
    carrying ``position_ids``, restarting at 0 for each sample) get their ``position_ids`` and no
    ``attention_mask``: from position ids alone transformers builds a block-diagonal causal mask,
    one block per sample, so no token attends across a sample boundary; a padding mask would make
    it fall back to one causal mask over the whole row. Padding gets position 0, so every pad
    token is a block of its own that no real token sees. The model must run with
    ``use_cache=False`` (trl's trainers pass it): with a cache transformers does not look for
    packed sequences.
    """

    def __init__(self, pad_token_id: int, pad_to_multiple_of: int | None = None):
        self.pad_token_id = pad_token_id
        self.pad_to_multiple_of = pad_to_multiple_of

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        longest = max(len(r["input_ids"]) for r in rows)
        if self.pad_to_multiple_of:
            longest = -(-longest // self.pad_to_multiple_of) * self.pad_to_multiple_of
        packed = all("position_ids" in r for r in rows)
        shape = (len(rows), longest)
        batch = {
            "input_ids": torch.full(shape, self.pad_token_id, dtype=torch.long),
            "labels": torch.full(shape, -100, dtype=torch.long),
        }
        extra = "position_ids" if packed else "attention_mask"
        batch[extra] = torch.zeros(shape, dtype=torch.long)
        for i, row in enumerate(rows):
            n = len(row["input_ids"])
            batch["input_ids"][i, :n] = long_tensor(row["input_ids"])
            batch["labels"][i, :n] = long_tensor(row["labels"])
            batch[extra][i, :n] = long_tensor(row["position_ids"]) if packed else 1
        return batch
