"""The ``reference`` kernel backend: every op in plain PyTorch, autograd gives the backwards.

It is what CPU users run, the fallback for any op a faster backend lacks, and the ground truth
the Triton ops are tested and benchmarked against. Signatures: :mod:`ftengine.core.kernels`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from dataclasses import replace
from typing import Any

import torch
import torch.nn.functional as F

from ftengine.core.hookspecs import hookimpl
from ftengine.core.kernels import LoRAWeights
from ftengine.plugins.kernels.lm_head_ops import linear_cross_entropy_op
from ftengine.plugins.kernels.lm_head_ops import token_logprobs_op

CE_CHUNK_TOKENS = 4096


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, offset: float = 0.0) -> torch.Tensor:
    xf = x.float()
    y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return (y * (offset + weight.float())).to(x.dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def rope(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if cos.dim() == 3:  # (B, T, D) -> broadcast over heads
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    q_out = q * cos + _rotate_half(q) * sin
    k_out = k * cos + _rotate_half(k) * sin
    return q_out.to(q.dtype), k_out.to(k.dtype)


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return F.silu(gate) * up


def geglu(gate: torch.Tensor, up: torch.Tensor, approximate: str = "tanh") -> torch.Tensor:
    return F.gelu(gate, approximate=approximate) * up


class _ChunkedLinearCE(torch.autograd.Function):
    """LM head + cross-entropy in token chunks: the (N, V) logits never exist at once.

    For each chunk, logits z = h W^T (fp32), optional softcap c: s = c tanh(z / c).
    loss_i = logsumexp(s_i) - s_i[y_i].  d loss_i / d s_i = softmax(s_i) - onehot(y_i);
    through the softcap, ds/dz = 1 - tanh^2(z/c) = 1 - (s/c)^2.  Then dh = dz W, dW = dz^T h.
    The gradients are computed in the forward (the loss is a scalar, so the backward only scales
    them by the incoming gradient), which is what lets each chunk's logits be freed at once.
    """

    @staticmethod
    def forward(ctx, hidden, weight, labels, ignore_index, softcap):
        n_valid = (labels != ignore_index).sum().clamp(min=1)
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad_h = torch.zeros_like(hidden) if hidden.requires_grad else None
        grad_w = torch.zeros_like(weight, dtype=torch.float32) if weight.requires_grad else None
        for start in range(0, hidden.shape[0], CE_CHUNK_TOKENS):
            h = hidden[start : start + CE_CHUNK_TOKENS]
            y = labels[start : start + CE_CHUNK_TOKENS]
            z = h.float() @ weight.float().t()  # (n, V)
            s = softcap * torch.tanh(z / softcap) if softcap else z
            valid = y != ignore_index
            lse = torch.logsumexp(s, dim=-1)
            target = s.gather(1, y.clamp(min=0).unsqueeze(1)).squeeze(1)
            total += torch.where(valid, lse - target, 0.0).sum()
            if grad_h is None and grad_w is None:
                continue
            dz = torch.softmax(s, dim=-1)
            dz.scatter_add_(1, y.clamp(min=0).unsqueeze(1), -torch.ones_like(target).unsqueeze(1))
            dz *= valid.unsqueeze(1)
            if softcap:
                dz *= 1 - (s / softcap) ** 2
            dz /= n_valid
            if grad_h is not None:
                grad_h[start : start + CE_CHUNK_TOKENS] = (dz @ weight.float()).to(hidden.dtype)
            if grad_w is not None:
                grad_w += dz.t() @ h.float()
        ctx.save_for_backward(grad_h if grad_h is not None else torch.empty(0),
                              grad_w if grad_w is not None else torch.empty(0))
        ctx.has = (grad_h is not None, grad_w is not None)
        ctx.weight_dtype = weight.dtype
        return total / n_valid

    @staticmethod
    def backward(ctx, grad_out):
        grad_h, grad_w = ctx.saved_tensors
        dh = grad_h * grad_out if ctx.has[0] else None
        dw = (grad_w * grad_out).to(ctx.weight_dtype) if ctx.has[1] else None
        return dh, dw, None, None, None


linear_cross_entropy = linear_cross_entropy_op(_ChunkedLinearCE)


LOGPROB_CHUNK_ELEMENTS = 2**26
"""Logit elements (rows x vocabulary) of one chunk of :func:`token_logprobs`: 256 MiB in fp32."""


def _scaled_logits(h: torch.Tensor, weight: torch.Tensor, softcap: float | None,
                   temperature: float) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The chunk's logits ``softcap(h W^T) / temperature`` in fp32, and ``tanh(z / softcap)`` for the backward."""
    z = h.float() @ weight.float().t()
    t = None
    if softcap:
        t = torch.tanh(z / softcap)
        z = softcap * t
    return z / temperature, t


class _ChunkedTokenLogprobs(torch.autograd.Function):
    """log softmax(s)[y] per row, s = softcap(h W^T) / T, a chunk of rows at a time.

    Forward keeps only the inputs; backward recomputes each chunk's logits:
    d logp / d s = onehot(y) - softmax(s), then / T, times 1 - tanh^2 through the softcap,
    dh = dz W and dW = dz^T h. No (N, V) tensor exists in either pass.
    """

    @staticmethod
    def forward(ctx, hidden, weight, labels, softcap, temperature, with_stats):
        n, vocab = hidden.shape[0], weight.shape[0]
        rows = max(1, LOGPROB_CHUNK_ELEMENTS // vocab)
        logp = torch.empty(n, dtype=torch.float32, device=hidden.device)
        stats = torch.empty(n, 3, dtype=torch.float32, device=hidden.device) if with_stats else None
        for start in range(0, n, rows):
            s, _ = _scaled_logits(hidden[start:start + rows], weight, softcap, temperature)
            y = labels[start:start + rows]
            lse = torch.logsumexp(s, dim=-1)
            target = s.gather(1, y.unsqueeze(1)).squeeze(1)
            logp[start:start + rows] = target - lse
            if stats is not None:
                p_log_p = torch.softmax(s, dim=-1) * (s - lse.unsqueeze(1))
                stats[start:start + rows, 0] = -p_log_p.sum(-1)
                stats[start:start + rows, 1] = s.mean(-1)
                stats[start:start + rows, 2] = (s.argmax(-1) == y).float()
        ctx.save_for_backward(hidden, weight, labels)
        ctx.softcap, ctx.temperature = softcap, temperature
        ctx.mark_non_differentiable(*([stats] if stats is not None else []))
        return (logp, stats) if with_stats else logp

    @staticmethod
    def backward(ctx, grad_logp, *_):
        hidden, weight, labels = ctx.saved_tensors
        n, vocab = hidden.shape[0], weight.shape[0]
        rows = max(1, LOGPROB_CHUNK_ELEMENTS // vocab)
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_h = torch.empty_like(hidden) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        for start in range(0, n, rows):
            h = hidden[start:start + rows]
            s, t = _scaled_logits(h, weight, ctx.softcap, ctx.temperature)
            y = labels[start:start + rows]
            g = grad_logp[start:start + rows].float().unsqueeze(1)
            dz = torch.softmax(s, dim=-1).mul_(-g)
            dz.scatter_add_(1, y.unsqueeze(1), g)
            dz /= ctx.temperature
            if t is not None:
                dz *= 1 - t * t
            if need_h:
                grad_h[start:start + rows] = (dz @ weight.float()).to(hidden.dtype)
            if need_w:
                grad_w += dz.t() @ h.float()
        return grad_h, (grad_w.to(weight.dtype) if need_w else None), None, None, None, None


token_logprobs = token_logprobs_op(_ChunkedTokenLogprobs)


def _base_weight(layer: LoRAWeights, dtype: torch.dtype) -> torch.Tensor:
    if layer.quant_state is not None:
        return dequantize_nf4(layer.weight, layer.quant_state).to(dtype)
    return layer.weight.to(dtype)


def lora_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    lora_a: torch.Tensor | None,
    lora_b: torch.Tensor | None,
    scaling: float,
    bias: torch.Tensor | None = None,
    quant_state: Any = None,
) -> torch.Tensor:
    w = _base_weight(LoRAWeights(weight, quant_state=quant_state), x.dtype)
    y = F.linear(x, w, bias)
    if lora_a is not None and lora_b is not None:
        y = y + scaling * F.linear(F.linear(x, lora_a.to(x.dtype)), lora_b.to(x.dtype))
    return y


def _apply(x: torch.Tensor, layer: LoRAWeights) -> torch.Tensor:
    return lora_linear(x, layer.weight, layer.lora_a, layer.lora_b, layer.scaling, layer.bias, layer.quant_state)


def _gated(gate: torch.Tensor, up: torch.Tensor, activation: str, what: str) -> torch.Tensor:
    """``act(gate) * up`` for the ``lora_mlp`` / ``lora_moe`` activation names."""
    if activation == "swiglu":
        return swiglu(gate, up)
    if activation in ("geglu", "geglu_tanh"):
        return geglu(gate, up, approximate="tanh" if activation == "geglu_tanh" else "none")
    raise ValueError(f"unknown {what} activation {activation!r}; expected swiglu, geglu or geglu_tanh")


def lora_mlp(x: torch.Tensor, gate: LoRAWeights, up: LoRAWeights, down: LoRAWeights, activation: str = "swiglu"):
    return _apply(_gated(_apply(x, gate), _apply(x, up), activation, "MLP"), down)


def lora_qkv(x: torch.Tensor, q: LoRAWeights, k: LoRAWeights, v: LoRAWeights):
    return _apply(x, q), _apply(x, k), _apply(x, v)


def _grouped_mm_ok(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether ``torch._grouped_mm`` takes these operands: CPU fp32/bf16/fp16, CUDA bf16 on sm80+, and on
    both rows and base pointers on 16-byte boundaries (a rank-4 bf16 LoRA factor is not)."""
    if not hasattr(torch, "_grouped_mm") or x.dtype != weight.dtype:
        return False
    if x.device.type == "cpu":
        dtype_ok = x.dtype in (torch.float32, torch.bfloat16, torch.float16)
    else:
        dtype_ok = (x.device.type == "cuda" and x.dtype == torch.bfloat16
                    and torch.cuda.get_device_capability(x.device) >= (8, 0))
    size = x.element_size()
    aligned = all(n * size % 16 == 0 for n in (x.shape[-1], weight.shape[-2]))
    return dtype_ok and aligned and x.data_ptr() % 16 == 0 and weight.data_ptr() % 16 == 0


class _ContiguousGrad(torch.autograd.Function):
    """Identity whose backward makes the incoming gradient contiguous (``_grouped_mm``'s backward needs it)."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad.contiguous()


def grouped_linear(x: torch.Tensor, weight: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """Rows ``offsets[e-1]:offsets[e]`` of ``x`` times ``weight[e].T``, for every expert ``e`` at once.

    Args:
        x: ``(S, in)``, rows sorted by expert.
        weight: ``(E, out, in)``.
        offsets: ``(E,)`` int32, the running row count after each expert.

    Returns:
        ``(S, out)``: one grouped GEMM (``torch._grouped_mm``) where the device and dtype allow it,
        else one matmul per expert over its slice of rows (never a loop over tokens).
    """
    weight = weight.to(x.dtype)
    if _grouped_mm_ok(x, weight):
        return _ContiguousGrad.apply(torch._grouped_mm(x.contiguous(), weight.transpose(-2, -1), offs=offsets))
    bounds = [0, *offsets.tolist()]
    pieces = [x[bounds[e]:bounds[e + 1]] @ weight[e].t() for e in range(weight.shape[0])]
    return torch.cat(pieces) if pieces else x.new_zeros(0, weight.shape[1])


GroupedLinear = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
Dequantize = Callable[[torch.Tensor, Any], torch.Tensor]
NF4Linear = Callable[[torch.Tensor, torch.Tensor, Any, torch.Tensor], torch.Tensor]
"""``(x, packed, state, offsets) -> y``: the grouped GEMM of NF4 expert weights, differentiable in ``x``."""

EXPERT_GROUP_BYTES = 2**30
"""The most dequantized expert weight (bytes) one NF4 grouped GEMM holds at once. A layer's experts that fit
are unpacked together into one grouped GEMM over every row, which needs no row count on the host
(Qwen3-30B-A3B's ``gate_up`` is 768 MiB); larger ones go a group of experts at a time, each group's rows
located by the counts read back once a call."""


def expert_groups(state: NF4State, dtype: torch.dtype, budget: int | None = None) -> list[tuple[int, int]]:
    """``[(start, stop), ...]``: consecutive experts whose dequantized weights fit ``budget`` bytes together
    (at least one expert a group)."""
    per_expert = math.prod(state.shape[1:]) * torch.empty(0, dtype=dtype).element_size()
    size = max(1, (EXPERT_GROUP_BYTES if budget is None else budget) // per_expert)
    return [(start, min(start + size, state.shape[0])) for start in range(0, state.shape[0], size)]


class _NF4GroupedLinear(torch.autograd.Function):
    """``y_e = x_e W_e^T`` per expert with ``W`` NF4 (frozen), unpacked a layer or a group of experts at a time.

    Forward: for each group ``[s, t)`` of experts (one group, all of them, where they fit
    :data:`EXPERT_GROUP_BYTES`), ``W_s..W_t`` are dequantized, multiply their rows of ``x`` and are
    freed. Backward: ``dx_e = dy_e W_e``, the groups dequantized again (nothing but the packed weight
    is kept between the passes); the base weight gets no gradient.
    """

    @staticmethod
    def forward(ctx, x, packed, state, offsets, dequantize, linear):
        groups = expert_groups(state, x.dtype)
        bounds = [0, *offsets.tolist()] if len(groups) > 1 else None
        ctx.save_for_backward(offsets)
        ctx.packed, ctx.state, ctx.dequantize, ctx.linear = packed, state, dequantize, linear
        ctx.groups, ctx.bounds = groups, bounds
        return _nf4_products(x, packed, state, offsets, groups, bounds, dequantize, linear, transpose=False)

    @staticmethod
    def backward(ctx, grad):
        (offsets,) = ctx.saved_tensors
        dx = _nf4_products(grad, ctx.packed, ctx.state, offsets, ctx.groups, ctx.bounds, ctx.dequantize, ctx.linear,
                           transpose=True)
        return dx, None, None, None, None, None


def _nf4_products(x: torch.Tensor, packed: torch.Tensor, state: NF4State, offsets: torch.Tensor,
                  groups: list[tuple[int, int]], bounds: list[int] | None, dequantize: Dequantize,
                  linear: GroupedLinear, transpose: bool) -> torch.Tensor:
    """Each expert's rows of ``x`` times ``W_e^T`` (``W_e`` when ``transpose``); ``bounds`` (each expert's first
    row, then the total) is needed only for more than one group."""

    def unpacked(start: int, stop: int) -> torch.Tensor:
        weight = dequantize(*state.experts(packed, start, stop)).to(x.dtype)  # (G, out, in)
        return weight.transpose(-2, -1) if transpose else weight

    if bounds is None:
        return linear(x, unpacked(0, state.shape[0]), offsets)
    out = x.new_empty(x.shape[0], state.shape[2] if transpose else state.shape[1])
    for start, stop in groups:
        lo, hi = bounds[start], bounds[stop]
        if hi > lo:
            out[lo:hi] = linear(x[lo:hi], unpacked(start, stop), offsets[start:stop] - lo)
    return out


def nf4_grouped_linear(x: torch.Tensor, packed: torch.Tensor, state: NF4State, offsets: torch.Tensor,
                       linear: GroupedLinear = grouped_linear, dequantize: Dequantize | None = None) -> torch.Tensor:
    """``x_e @ W_e.T`` per expert with ``W`` NF4 (frozen), dequantized a layer or a group of experts at a time
    (:data:`EXPERT_GROUP_BYTES`), in the forward and again in the backward; differentiable in ``x``."""
    return _NF4GroupedLinear.apply(x, packed, state, offsets, dequantize or dequantize_nf4, linear)


def expert_linear(x: torch.Tensor, layer: LoRAWeights, offsets: torch.Tensor, linear: GroupedLinear = grouped_linear,
                  nf4_linear: NF4Linear = nf4_grouped_linear) -> torch.Tensor:
    """``x_e @ W_e.T + scaling * (x_e @ A_e.T) @ B_e.T`` per expert, the LoRA kept low-rank (no ``W + BA``).

    An NF4 ``W`` (``layer.quant_state``, stored by :func:`quantize_nf4`) goes through ``nf4_linear``.
    """
    if layer.quant_state is not None:
        y = nf4_linear(x, layer.weight, layer.quant_state, offsets)
    else:
        y = linear(x, layer.weight, offsets)
    if layer.lora_a is not None and layer.lora_b is not None:
        low = linear(x, layer.lora_a, offsets)  # (S, r)
        y = y + layer.scaling * linear(low, layer.lora_b.contiguous(), offsets)
    return y


class _DispatchRows(torch.autograd.Function):
    """``x[order // top_k]``: each token's row once for every expert it goes to, sorted by expert.

    Backward: the rows' gradients put back in (token, k) order (a permutation: no atomics, no sort) and
    summed over ``k``, where indexing's own backward accumulates through a sort of the indices.
    """

    @staticmethod
    def forward(ctx, x, order, top_k):
        ctx.save_for_backward(order)
        ctx.top_k = top_k
        return x.index_select(0, order // top_k)

    @staticmethod
    def backward(ctx, grad):
        (order,) = ctx.saved_tensors
        return _unsorted(grad, order).view(-1, ctx.top_k, grad.shape[-1]).sum(dim=1), None, None


def _unsorted(rows: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    """Expert-sorted rows back in (token, k) order (row ``i`` to ``order[i]``): a permutation, so no atomics and
    no sort; the result is contiguous whatever the rows' strides."""
    return rows.new_empty(rows.shape).index_copy_(0, order, rows)


def lora_moe(
    x: torch.Tensor,
    top_k_index: torch.Tensor,
    top_k_weights: torch.Tensor,
    gate_up: LoRAWeights,
    down: LoRAWeights,
    activation: str = "swiglu",
    linear: GroupedLinear = grouped_linear,
    nf4_linear: NF4Linear = nf4_grouped_linear,
) -> torch.Tensor:
    """The op; a backend may pass its own grouped GEMM ``linear`` and NF4 grouped GEMM ``nf4_linear``."""
    n_tokens, top_k = top_k_index.shape
    n_experts = gate_up.weight.shape[0] if gate_up.quant_state is None else gate_up.quant_state.shape[0]
    flat = top_k_index.reshape(-1)  # (S,) with S = N * K, row s is token s // K
    order = torch.argsort(flat, stable=True)
    counts = torch.zeros(n_experts, dtype=torch.int64, device=flat.device).scatter_add_(0, flat, torch.ones_like(flat))
    offsets = torch.cumsum(counts, 0).to(torch.int32)  # (bincount reads its maximum back to the host)
    rows = _DispatchRows.apply(x, order, top_k)  # (S, H) sorted by expert
    gate, up = expert_linear(rows, gate_up, offsets, linear, nf4_linear).chunk(2, dim=-1)  # (S, I) each
    hidden = _gated(gate, up, activation, "MoE")
    out = expert_linear(hidden, down, offsets, linear, nf4_linear)  # (S, H)
    return _weighted_sum(_unsorted(out, order).view(n_tokens, top_k, -1), top_k_weights).to(x.dtype)  # (N, H)


def _weighted_sum(rows: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """``sum_k weights[n, k] * rows[n, k]`` in fp32 at least: one batched GEMM (fp32 accumulation inside it) when
    both share a dtype, else the products and sum in the promoted dtype."""
    if weights.dtype == rows.dtype:
        return torch.bmm(weights.unsqueeze(1), rows).squeeze(1)
    acc = torch.promote_types(torch.promote_types(rows.dtype, weights.dtype), torch.float32)
    return (rows.to(acc) * weights.to(acc).unsqueeze(-1)).sum(dim=1)


_NF4_CODE = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
)


def _absmax(quant_state: Any) -> torch.Tensor:
    """The per-block absmax, undoing bitsandbytes' double quantization when it was used."""
    absmax = quant_state.absmax.reshape(-1)
    if getattr(quant_state, "nested", False):
        s2 = quant_state.state2
        blocks = s2.code[absmax.long()].float()  # uint8 codes -> fp32 through the 256-entry code
        n = blocks.numel()
        scale = s2.absmax.float().reshape(-1).repeat_interleave(s2.blocksize)[:n]
        absmax = blocks * scale + float(quant_state.offset)
    return absmax.float()


def dequantize_nf4(packed: torch.Tensor, quant_state: Any) -> torch.Tensor:
    """bitsandbytes NF4: two 4-bit codes per byte (high nibble first), one absmax per block. The bytes
    may be stored as another dtype (bitsandbytes' ``quant_storage``, which FSDP shards with the other
    weights): they are read as uint8."""
    flat = packed.reshape(-1).view(torch.uint8)
    codes = torch.stack(((flat >> 4) & 0xF, flat & 0xF), dim=1).reshape(-1).long()
    table = torch.tensor(_NF4_CODE, dtype=torch.float32, device=packed.device)
    n = 1
    for d in quant_state.shape:
        n *= d
    values = table[codes[:n]]
    absmax = _absmax(quant_state).repeat_interleave(quant_state.blocksize)[:n]
    return (values * absmax).to(quant_state.dtype).reshape(quant_state.shape)


NF4_BLOCKSIZE = 64
NESTED_BLOCKS = 256
"""Blocks whose (uint8-coded) absmax share one fp32 scale under double quantization, at most."""


@dataclass
class NF4Nested:
    """The second level of double quantization: ``absmax[b] = code[q_b] * absmax2[b // blocksize] + offset``."""

    code: torch.Tensor  # (256,) fp32
    absmax: torch.Tensor  # (R, blocks / blocksize) fp32
    blocksize: int


@dataclass
class NF4State:
    """What :func:`dequantize_nf4` reads (the fields of bitsandbytes' ``QuantState`` it uses), for tensors
    that :func:`quantize_nf4` packs row by row along their leading dim (one row per expert).

    Attributes:
        absmax: ``(R, blocks)``: fp32, or uint8 codes into ``state2.code`` when ``nested``.
        shape: the unpacked shape, leading dim ``R``.
        dtype: the unpacked dtype.
    """

    absmax: torch.Tensor
    shape: torch.Size
    dtype: torch.dtype
    blocksize: int = NF4_BLOCKSIZE
    nested: bool = False
    state2: NF4Nested | None = None
    offset: torch.Tensor | float = 0.0
    quant_type: str = "nf4"

    def experts(self, packed: torch.Tensor, start: int, stop: int) -> tuple[torch.Tensor, NF4State]:
        """Rows ``start:stop`` of the packed tensor and their state, without copying."""
        state2 = None if self.state2 is None else replace(self.state2, absmax=self.state2.absmax[start:stop])
        return packed[start:stop], replace(self, absmax=self.absmax[start:stop], state2=state2,
                                           shape=torch.Size((stop - start, *self.shape[1:])))

    def nbytes(self, packed: torch.Tensor) -> int:
        """Bytes the packed weight and its state hold."""
        tensors = [packed, self.absmax] + ([] if self.state2 is None else [self.state2.absmax, self.state2.code])
        return sum(t.numel() * t.element_size() for t in tensors)


QUANTIZE_CHUNK_ELEMENTS = 2**24
"""Elements quantized at once (their fp32 copy and codes are the temporaries)."""


def quantize_nf4(weight: torch.Tensor, blocksize: int = NF4_BLOCKSIZE,
                 double_quant: bool = True) -> tuple[torch.Tensor, NF4State]:
    """NF4 in bitsandbytes' layout, each row of the leading dim (an expert) in blocks of its own.

    Each block of ``blocksize`` values keeps ``absmax = max |w|`` and, per value, the index of the
    NF4 level nearest ``w / absmax``; two indices a byte, the first in the high nibble. With
    ``double_quant`` the absmax are stored as uint8 codes of ``(absmax - mean) / absmax2`` on a
    uniform 256-level grid over ``[-1, 1]``, one fp32 ``absmax2`` per group of up to
    :data:`NESTED_BLOCKS` blocks of one row, the mean as the offset: about 4.13 bits a weight.

    Args:
        weight: ``(R, ...)``, each row holding a whole number of blocks.

    Returns:
        ``(packed, state)``: packed ``(R, n / 2)`` uint8 and its :class:`NF4State`.

    Raises:
        ValueError: a row that is not a whole number of blocks.
    """
    rows = weight.shape[0]
    per_row = weight.numel() // max(rows, 1)
    if per_row % blocksize or blocksize % 2:
        raise ValueError(f"quantize_nf4: each of the {rows} rows holds {per_row} values, not a whole number of "
                         f"blocks of {blocksize}")
    levels = torch.tensor(_NF4_CODE, dtype=torch.float32, device=weight.device)
    midpoints = (levels[1:] + levels[:-1]) / 2
    flat = weight.detach().reshape(rows, per_row)
    packed = torch.empty(rows, per_row // 2, dtype=torch.uint8, device=weight.device)
    absmax = torch.empty(rows, per_row // blocksize, dtype=torch.float32, device=weight.device)
    step = max(1, QUANTIZE_CHUNK_ELEMENTS // per_row)
    for r in range(0, rows, step):
        blocks = flat[r:r + step].float().reshape(-1, per_row // blocksize, blocksize)  # (r, nb, bs)
        scale = blocks.abs().amax(-1)  # (r, nb)
        codes = torch.bucketize(blocks / scale.clamp_min(torch.finfo(torch.float32).tiny).unsqueeze(-1), midpoints)
        codes = codes.to(torch.uint8).reshape(blocks.shape[0], -1, 2)
        packed[r:r + step] = (codes[..., 0] << 4) | codes[..., 1]
        absmax[r:r + step] = scale
    state = NF4State(absmax=absmax, shape=weight.shape, dtype=weight.dtype, blocksize=blocksize)
    if not double_quant:
        return packed, state
    n_blocks = absmax.shape[1]
    group = math.gcd(n_blocks, NESTED_BLOCKS)  # groups never straddle two rows
    offset = absmax.mean()
    centered = (absmax - offset).reshape(rows, -1, group)  # (R, groups, group)
    absmax2 = centered.abs().amax(-1).clamp_min(torch.finfo(torch.float32).tiny)  # (R, groups)
    q = ((centered / absmax2.unsqueeze(-1) + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)
    code = torch.linspace(-1.0, 1.0, 256, dtype=torch.float32, device=weight.device)
    return packed, replace(state, absmax=q.reshape(rows, n_blocks), nested=True, offset=offset,
                           state2=NF4Nested(code=code, absmax=absmax2, blocksize=group))


class ReferenceBackend:
    name = "reference"
    priority = 0
    rms_norm = staticmethod(rms_norm)
    rope = staticmethod(rope)
    swiglu = staticmethod(swiglu)
    geglu = staticmethod(geglu)
    linear_cross_entropy = staticmethod(linear_cross_entropy)
    token_logprobs = staticmethod(token_logprobs)
    lora_linear = staticmethod(lora_linear)
    lora_mlp = staticmethod(lora_mlp)
    lora_qkv = staticmethod(lora_qkv)
    lora_moe = staticmethod(lora_moe)
    dequantize_nf4 = staticmethod(dequantize_nf4)
    quantize_nf4 = staticmethod(quantize_nf4)

    def available(self) -> bool:
        return True


@hookimpl
def register_kernels(register):
    register(ReferenceBackend())
