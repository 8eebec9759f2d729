"""The labelled rows of the LM head's input, in chunks whose logits fit a byte budget.

Only the tokens with a label take part: the ignored ones (prompts, padding) have no loss and no
gradient, so their rows are left out of every matmul. Chunk sizes need the labelled rows' count on
the host; it is copied there behind the work already queued, and the first chunk (a full one: the
first labelled rows, padded when there are fewer) is taken before the host waits for it, so the GPU
does not idle behind that sync while the host launches the next kernels.
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Iterator
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Plan:
    """How the op runs: chunk size, tile alignment and path.

    Attributes:
        chunk_bytes: logit bytes per chunk at most (the op's extra memory is about one chunk of
            logits plus the gradients).
        tile_rows: chunk rows come in multiples of this, the matmuls' tile height, so the tiles cover
            them exactly.
        path: ``two_pass``, ``one_pass`` or ``epilogue`` to force one; ``None`` lets
            :func:`~ftengine.plugins.kernels.triton.linear_cross_entropy.choose_path` pick.
    """

    chunk_bytes: int = 368 * 1024 * 1024
    tile_rows: int = 128
    path: str | None = None

    def rows_per_chunk(self, row_bytes: int) -> int:
        """The most rows whose logits fit in :attr:`chunk_bytes`."""
        return max(1, self.chunk_bytes // max(1, row_bytes))

    def bounds(self, n_rows: int, per_chunk: int) -> list[int]:
        """Chunk boundaries: at most ``per_chunk`` rows each, in whole tiles of rows but the last, near-equal.

        Near-equal: no small last matmul. Fewer than :attr:`tile_rows` rows per chunk drops the tiles.
        """
        if per_chunk < self.tile_rows:
            n_chunks = -(-n_rows // per_chunk)
            return [i * n_rows // n_chunks for i in range(n_chunks + 1)]
        tiles = -(-n_rows // self.tile_rows)
        n_chunks = -(-tiles // (per_chunk // self.tile_rows))
        return [min(n_rows, self.tile_rows * (i * tiles // n_chunks)) for i in range(n_chunks + 1)]


def labelled_first(mask: torch.Tensor, fill: int) -> torch.Tensor:
    """The indices of ``mask``'s true entries in order, then ``fill`` up to ``mask``'s length, without a host sync.

    ``torch.nonzero_static`` does this, but on CUDA only from torch 2.6.
    """
    n = mask.numel()
    slot = torch.where(mask, mask.cumsum(0) - 1, n)  # the others land in a spare last slot
    out = torch.full((n + 1,), fill, dtype=torch.long, device=mask.device)
    return out.scatter_(0, slot, torch.arange(n, device=mask.device))[:n]


class Work:
    """What every path shares: the inputs, the labelled rows, the chunks, and the outputs they fill.

    The number of labelled rows is copied to the host behind the work already queued and read
    only when a path needs it. With ``speculate``, the first chunk is taken before that: the first
    labelled rows of a chunk's size (:func:`labelled_first`, padded with out-of-range rows that have
    no label and store nothing), so its matmuls are queued while the host waits for the count.
    """

    def __init__(self, hidden, w, labels, ignore_index, softcap, need_dh, dw, speculate, plan: Plan):
        self.hidden, self.w, self.labels, self.softcap, self.need_dh, self.dw = hidden, w, labels, softcap, need_dh, dw
        self.plan = plan
        self.n_rows = hidden.shape[0]
        self.labelled = labels != ignore_index
        count = self.labelled.sum()
        self._counted = None
        if count.is_cuda:
            self._count = torch.empty((), dtype=count.dtype, pin_memory=True).copy_(count, non_blocking=True)
            self._counted = torch.cuda.Event()
            self._counted.record(torch.cuda.current_stream(count.device))  # the LM head's device, not the current one
        else:
            self._count = count
        self.softcap_arg = float(softcap) if softcap else 1.0  # the kernels' argument (unused without softcap)
        self.per_chunk = plan.rows_per_chunk(self.w.shape[0] * self.w.element_size())
        # the first chunk is a full one (in whole tiles), so its buffers serve every later chunk
        tile = plan.tile_rows
        full = self.per_chunk // tile * tile if self.per_chunk >= tile else self.per_chunk
        self.first = min(self.n_rows, full) if speculate else 0
        self.losses = torch.zeros(self.n_rows, dtype=torch.float32, device=hidden.device)

    @functools.cached_property
    def n_valid(self) -> int:
        """The labelled rows' count (waits for it, once)."""
        if self._counted is not None:
            self._counted.synchronize()
        return int(self._count)

    @property
    def compact(self) -> bool:
        return self.n_valid < self.n_rows

    @property
    def inv_n_valid(self) -> float:
        return 1.0 / max(1, self.n_valid)

    @functools.cached_property
    def dh(self) -> torch.Tensor:
        """``dL/dhidden`` (empty when not asked for); zeros where rows are ignored, so it waits for the count."""
        if not self.need_dh:
            return self.hidden.new_empty(0)
        return torch.zeros_like(self.hidden) if self.compact else torch.empty_like(self.hidden)

    def chunks(self) -> Iterator[tuple[slice, torch.Tensor, torch.Tensor, torch.Tensor]]:
        """Per chunk of labelled rows: its slice of them, their row indices, labels and hidden states."""
        rows = labelled_first(self.labelled, self.n_rows)
        if self.first:
            head = rows[:self.first]
            inside = head.clamp(max=self.n_rows - 1)
            labels = torch.where(head < self.n_rows, self.labels.index_select(0, inside), -1)
            yield slice(0, self.first), head, labels, self.hidden.index_select(0, inside)
        if self.n_valid <= self.first:
            return
        rows = rows[:self.n_valid]
        labels = self.labels.index_select(0, rows) if self.compact else self.labels
        bounds = [self.first + b for b in self.plan.bounds(self.n_valid - self.first, self.per_chunk)]
        for start, stop in itertools.pairwise(bounds):
            h = self.hidden.index_select(0, rows[start:stop]) if self.compact else self.hidden[start:stop]
            yield slice(start, stop), rows[start:stop], labels[start:stop], h
