"""The ``reference`` kernel backend: every op in plain PyTorch, autograd gives the backwards.

It is what CPU users run, the fallback for any op a faster backend lacks, and the ground truth
the Triton ops are tested and benchmarked against. Signatures: :mod:`ftengine.core.kernels`.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from ftengine.core.hookspecs import hookimpl
from ftengine.core.kernels import LoRAWeights

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


def linear_cross_entropy(
    hidden: torch.Tensor,
    lm_head_weight: torch.Tensor,
    labels: torch.Tensor,
    ignore_index: int = -100,
    softcap: float | None = None,
) -> torch.Tensor:
    hidden = hidden.reshape(-1, hidden.shape[-1])
    return _ChunkedLinearCE.apply(hidden, lm_head_weight, labels.reshape(-1), ignore_index, softcap)


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


def token_logprobs(
    hidden: torch.Tensor,
    lm_head_weight: torch.Tensor,
    labels: torch.Tensor,
    softcap: float | None = None,
    temperature: float = 1.0,
    with_stats: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    return _ChunkedTokenLogprobs.apply(hidden.reshape(-1, hidden.shape[-1]), lm_head_weight, labels.reshape(-1),
                                       softcap, temperature, with_stats)


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


def _expert_linear(x: torch.Tensor, layer: LoRAWeights, offsets: torch.Tensor) -> torch.Tensor:
    """``x_e @ W_e.T + scaling * (x_e @ A_e.T) @ B_e.T`` per expert, the LoRA kept low-rank (no ``W + BA``)."""
    base = dequantize_nf4(layer.weight, layer.quant_state) if layer.quant_state is not None else layer.weight
    y = grouped_linear(x, base, offsets)
    if layer.lora_a is not None and layer.lora_b is not None:
        low = grouped_linear(x, layer.lora_a, offsets)  # (S, r)
        y = y + layer.scaling * grouped_linear(low, layer.lora_b.contiguous(), offsets)
    return y


def lora_moe(
    x: torch.Tensor,
    top_k_index: torch.Tensor,
    top_k_weights: torch.Tensor,
    gate_up: LoRAWeights,
    down: LoRAWeights,
    activation: str = "swiglu",
) -> torch.Tensor:
    n_tokens, top_k = top_k_index.shape
    n_experts = gate_up.weight.shape[0] if gate_up.quant_state is None else gate_up.quant_state.shape[0]
    flat = top_k_index.reshape(-1)  # (S,) with S = N * K, row s is token s // K
    order = torch.argsort(flat, stable=True)
    offsets = torch.cumsum(torch.bincount(flat, minlength=n_experts), 0).to(torch.int32)
    rows = x[order // top_k]  # (S, H) sorted by expert
    gate, up = _expert_linear(rows, gate_up, offsets).chunk(2, dim=-1)  # (S, I) each
    hidden = _gated(gate, up, activation, "MoE")
    acc = torch.promote_types(x.dtype, torch.float32)  # the k-sum in fp32 at least
    out = _expert_linear(hidden, down, offsets).to(acc) * top_k_weights.reshape(-1)[order].to(acc).unsqueeze(-1)
    unsorted = torch.empty_like(out).index_copy(0, order, out)  # back to (token, k) order: a permutation, no sums
    return unsorted.view(n_tokens, top_k, -1).sum(dim=1).to(x.dtype)  # (N, H)


_NF4_CODE = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
)


def _absmax(quant_state: Any) -> torch.Tensor:
    """The per-block absmax, undoing bitsandbytes' double quantization when it was used."""
    absmax = quant_state.absmax
    if getattr(quant_state, "nested", False):
        s2 = quant_state.state2
        blocks = s2.code[absmax.long()].float()  # uint8 codes -> fp32 through the 256-entry code
        n = blocks.numel()
        scale = s2.absmax.float().repeat_interleave(s2.blocksize)[:n]
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

    def available(self) -> bool:
        return True


@hookimpl
def register_kernels(register):
    register(ReferenceBackend())
