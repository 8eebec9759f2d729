"""The epilogue path (bf16 on Hopper and later): no pass over the logits at all.

Per chunk, a Triton matmul writes ``q`` straight from its epilogue, shifted by the label's logit
(:mod:`.exp_logits_matmul`), so nothing reads the logits back; cuBLAS then makes ``q W`` and
:mod:`.finish` scales it. Why it is the default where it runs: the matmul costs a little more energy
than cuBLAS' but less than the pass it saves, and at the H100's power cap the energy sets the time
(benchmarks/RESULTS.md, the LM head's section).
"""

from __future__ import annotations

import torch

from ftengine.plugins.kernels.triton.linear_cross_entropy import exp_logits_matmul
from ftengine.plugins.kernels.triton.linear_cross_entropy import finish
from ftengine.plugins.kernels.triton.linear_cross_entropy.chunks import Work


def run(work: Work) -> None:
    """Per chunk: the label logits, ``q`` from the matmul's epilogue, each row's (shift, sum), then :mod:`.finish`."""
    n_vocab = work.w.shape[0]
    tiles = -(-n_vocab // exp_logits_matmul.tile_columns())
    padded = -(-n_vocab // 8) * 8  # q's rows 16-byte aligned for the copy engine
    q_buffer = work.w.new_empty((work.first, padded))[:, :n_vocab]
    sums = torch.empty((work.first, tiles), dtype=torch.float32, device=work.hidden.device)
    maxes = torch.empty_like(sums)
    state, target, coef, g = finish.buffers(work)
    for chunk in work.chunks():
        part, rows, labels, h = chunk
        n = rows.numel()
        q = q_buffer[:n]
        exp_logits_matmul.label_logits(h, work.w, labels, work.softcap, target[part])
        exp_logits_matmul.exp_logits(h, work.w, target[part], labels, work.softcap, q, sums[:n], maxes[:n])
        exp_logits_matmul.settle_rows(q, h, work.w, labels, target[part], sums[:n], maxes[:n], work.softcap,
                                      state[part])
        finish.finish_chunk(work, chunk, q, g, state, target, coef)
