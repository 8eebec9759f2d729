"""The attention of a Qwen2-VL / Qwen2.5-VL vision tower in one call for every image and window.

Hugging Face's ViT attention, outside FlashAttention, splits q, k and v at ``cu_seqlens`` (one chunk an
image, or a window in Qwen2.5-VL's windowed blocks), reads the chunk lengths back from the GPU and calls
the attention once a chunk: a device sync and a few launches a chunk in every block, forward and
recomputation alike, which at the sizes of formula images (a few hundred patches a batch) costs more
than the attention itself. Here the chunks are laid side by side, each padded to the longest, as a
``(chunks, heads, longest, head_dim)`` batch with a mask of the real keys, and attended in one SDPA call;
the padded queries are dropped. The math is the per-chunk attention's.

The layout (where each token goes, which keys are real) depends only on ``cu_seqlens``, which all blocks of
one tower forward share, so it is built once per ``cu_seqlens`` tensor (one read-back) and kept on it for
the other blocks and their recomputation under checkpointing. The projections run on ``lora_linear``
(:func:`linear_projection`).
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ftengine.plugins.models._patching import GetOp
from ftengine.plugins.models._patching import linear_projection

_LAYOUT_ATTR = "_ftengine_chunk_layout"


@dataclass(frozen=True)
class ChunkLayout:
    """Where the tokens of ``chunks`` consecutive chunks sit in a ``(chunks * longest)`` padded layout.

    Attributes:
        index: ``(tokens,)``: each token's row in the padded layout.
        keys: ``(chunks, 1, 1, longest)`` bool: the real keys of each chunk (SDPA's ``attn_mask``).
        chunks: how many chunks.
        longest: the longest chunk's length.
    """

    index: torch.Tensor
    keys: torch.Tensor
    chunks: int
    longest: int


def chunk_layout(cu_seqlens: torch.Tensor, tokens: int) -> ChunkLayout:
    """The padded layout of the chunks ``cu_seqlens`` delimits (cumulative lengths from 0), cached on it."""
    cached = getattr(cu_seqlens, _LAYOUT_ATTR, None)
    if cached is not None:
        return cached
    bounds = cu_seqlens.to(torch.long)
    lengths = bounds[1:] - bounds[:-1]
    longest = max(int(lengths.max()), 1)  # the one read-back from the device
    position = torch.arange(tokens, device=bounds.device)
    chunk = torch.searchsorted(bounds[1:], position, right=True)
    index = chunk * longest + (position - bounds[chunk])
    keys = torch.arange(longest, device=bounds.device) < lengths[:, None]
    keys |= (lengths == 0)[:, None]  # an empty chunk's padding attends to itself, not to nothing (no NaN)
    layout = ChunkLayout(index, keys[:, None, None, :], lengths.numel(), longest)
    setattr(cu_seqlens, _LAYOUT_ATTR, layout)
    return layout


def chunked_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: ChunkLayout,
                      scale: float) -> torch.Tensor:
    """Attention within each chunk: ``q``, ``k``, ``v`` ``(tokens, heads, head_dim)``; returns
    ``(tokens, heads * head_dim)``."""
    heads, dim = q.shape[1:]

    def padded(x: torch.Tensor) -> torch.Tensor:
        rows = x.new_zeros(layout.chunks * layout.longest, heads, dim).index_copy(0, layout.index, x)
        return rows.view(layout.chunks, layout.longest, heads, dim).transpose(1, 2)

    out = F.scaled_dot_product_attention(padded(q), padded(k), padded(v), attn_mask=layout.keys, scale=scale)
    return out.transpose(1, 2).reshape(layout.chunks * layout.longest, heads * dim).index_select(0, layout.index)


def vision_attention_forward(get_op: GetOp) -> Callable[..., torch.Tensor]:
    """The forward of a Qwen VL vision attention (``qkv``, ``proj``, ``num_heads``, ``head_dim``): FlashAttention
    configurations keep Hugging Face's (already one variable-length call)."""

    def forward(self: nn.Module, hidden_states: torch.Tensor, cu_seqlens: torch.Tensor,
                position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None, **kwargs) -> torch.Tensor:
        if "flash" in (self.config._attn_implementation or ""):
            return type(self).forward(self, hidden_states, cu_seqlens, position_embeddings=position_embeddings,
                                      **kwargs)
        tokens = hidden_states.shape[0]
        qkv = linear_projection(get_op, self.qkv, hidden_states, "vision qkv")
        q, k, v = qkv.reshape(tokens, 3, self.num_heads, -1).unbind(1)
        cos, sin = position_embeddings
        q, k = sys.modules[type(self).__module__].apply_rotary_pos_emb_vision(q, k, cos, sin)
        scale = getattr(self, "scaling", self.head_dim ** -0.5)
        out = chunked_attention(q, k, v, chunk_layout(cu_seqlens, tokens), scale)
        return linear_projection(get_op, self.proj, out, "vision proj")

    return forward
