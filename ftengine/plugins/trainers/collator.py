"""Batching of pre-tokenized samples: right-padding to the longest row of the batch."""

from __future__ import annotations

from typing import Any

import torch


class PadCollator:
    """Pads ``input_ids`` with the pad id, ``labels`` with -100, and builds ``attention_mask``.

    Rows carrying ``position_ids`` (packed rows) keep them, padded with zeros.
    """

    def __init__(self, pad_token_id: int, pad_to_multiple_of: int | None = None):
        self.pad_token_id = pad_token_id
        self.pad_to_multiple_of = pad_to_multiple_of

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        longest = max(len(r["input_ids"]) for r in rows)
        if self.pad_to_multiple_of:
            longest = -(-longest // self.pad_to_multiple_of) * self.pad_to_multiple_of
        batch = {
            "input_ids": torch.full((len(rows), longest), self.pad_token_id, dtype=torch.long),
            "labels": torch.full((len(rows), longest), -100, dtype=torch.long),
            "attention_mask": torch.zeros((len(rows), longest), dtype=torch.long),
        }
        with_positions = all("position_ids" in r for r in rows)
        if with_positions:
            batch["position_ids"] = torch.zeros((len(rows), longest), dtype=torch.long)
        for i, row in enumerate(rows):
            n = len(row["input_ids"])
            batch["input_ids"][i, :n] = torch.as_tensor(row["input_ids"])
            batch["labels"][i, :n] = torch.as_tensor(row["labels"])
            batch["attention_mask"][i, :n] = 1
            if with_positions:
                batch["position_ids"][i, :n] = torch.as_tensor(row["position_ids"])
        return batch
