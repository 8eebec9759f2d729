"""One padded SDPA call for every chunk of a vision tower against attention run chunk by chunk, as Hugging
Face's ViT attention runs it, in float64: outputs and the gradients of q, k and v."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from ftengine.plugins.models._vit_attention import chunk_layout
from ftengine.plugins.models._vit_attention import chunked_attention


def per_chunk(q, k, v, lengths, scale):
    outs = [F.scaled_dot_product_attention(*(x.transpose(0, 1)[None] for x in parts), scale=scale)[0].transpose(0, 1)
            for parts in zip(*(x.split(lengths) for x in (q, k, v)), strict=True)]
    return torch.cat(outs).flatten(1)


@pytest.mark.parametrize("lengths", [[16, 16, 7, 16, 3], [5], [64, 1, 64, 12]])
def test_one_padded_call_is_the_per_chunk_attention(lengths):
    torch.manual_seed(0)
    tokens, heads, dim = sum(lengths), 3, 8
    q, k, v = (torch.randn(tokens, heads, dim, dtype=torch.float64, requires_grad=True) for _ in range(3))
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    scale = dim ** -0.5
    ours = chunked_attention(q, k, v, chunk_layout(cu, tokens), scale)
    reference = per_chunk(q, k, v, lengths, scale)
    torch.testing.assert_close(ours, reference, rtol=1e-12, atol=1e-12)
    weight = torch.randn_like(reference)
    ours_grads = torch.autograd.grad((ours * weight).sum(), (q, k, v))
    reference_grads = torch.autograd.grad((reference * weight).sum(), (q, k, v))
    for a, b in zip(ours_grads, reference_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_the_layout_is_built_once_per_cu_seqlens_tensor():
    cu = torch.tensor([0, 4, 6, 6, 9], dtype=torch.int32)  # an empty chunk in the middle
    layout = chunk_layout(cu, 9)
    assert chunk_layout(cu, 9) is layout
    assert (layout.chunks, layout.longest) == (4, 4)
    assert layout.index.tolist() == [0, 1, 2, 3, 4, 5, 12, 13, 14]
    assert layout.keys[:, 0, 0].tolist() == [[True] * 4, [True, True, False, False], [True] * 4,
                                             [True, True, True, False]]
    q = torch.randn(9, 2, 4)
    assert torch.isfinite(chunked_attention(q, q, q, layout, 0.5)).all()
