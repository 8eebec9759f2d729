"""The kernel ops: their fixed set, their signatures, and the lookup that picks a backend per op.

A kernel backend is any object with ``name``, ``priority``, ``available()`` and, as attributes,
some of the functions below (autograd-aware, any leading batch dims). ``get_op(name)`` returns the
function of the highest-priority available backend that implements it, falling back op by op to
the ``reference`` backend, which implements them all in plain PyTorch.

Signatures (every backend implements exactly these):

``rms_norm(x, weight, eps, offset=0.0) -> y``
    ``y = x / sqrt(mean(x**2, -1) + eps) * (offset + weight)``; statistics in fp32, output in
    ``x.dtype``. ``offset=1.0`` gives Gemma's ``(1 + weight)``.
``rope(q, k, cos, sin) -> (q_out, k_out)``
    q ``(B, Hq, T, D)``, k ``(B, Hk, T, D)``, cos/sin ``(B, T, D)`` or ``(T, D)``; the
    rotate-half convention of Hugging Face Llama.
``swiglu(gate, up) -> silu(gate) * up``
``geglu(gate, up, approximate="tanh") -> gelu(gate, approximate) * up``
``linear_cross_entropy(hidden, lm_head_weight, labels, ignore_index=-100, softcap=None) -> loss``
    hidden ``(N, H)``, weight ``(V, H)``, labels ``(N,)`` already shifted; mean over non-ignored
    tokens; ``softcap`` applies ``softcap * tanh(logits / softcap)`` first (Gemma-2). Never
    materializes the full ``(N, V)`` logits.
``token_logprobs(hidden, lm_head_weight, labels, softcap=None, temperature=1.0, with_stats=False) -> logp``
    hidden ``(N, H)``, weight ``(V, H)``, labels ``(N,)`` (every one a real token id, already
    shifted); ``logp[i] = log_softmax(s_i)[labels[i]]`` in fp32 with ``s = softcap(hidden W^T) /
    temperature``, differentiable in ``hidden`` and ``weight``. Never materializes the ``(N, V)``
    logits, forward or backward. With ``with_stats`` it returns ``(logp, stats)``, ``stats`` an
    ``(N, 3)`` fp32 tensor without gradient: the entropy of ``softmax(s_i)``, the mean of ``s_i``
    and whether the label is the argmax (what preference and RL trainers log).
``lora_linear(x, weight, lora_a, lora_b, scaling, bias=None, quant_state=None) -> y``
    ``y = x @ W.T + bias + scaling * (x @ A.T) @ B.T``; W ``(out, in)``, A ``(r, in)``, B ``(out, r)``.
    With ``quant_state`` the weight is bitsandbytes-packed NF4 and is dequantized on the fly.
``lora_mlp(x, gate, up, down, activation="swiglu") -> y``
    each of gate/up/down a :class:`LoRAWeights`; ``activation`` one of ``swiglu``, ``geglu``,
    ``geglu_tanh``: ``y = down(act(gate(x), up(x)))``.
``lora_qkv(x, q, k, v) -> (q_out, k_out, v_out)``
    each of q/k/v a :class:`LoRAWeights`; one read of x serves the three projections.
``lora_moe(x, top_k_index, top_k_weights, gate_up, down, activation="swiglu") -> y``
    a mixture-of-experts MLP: x ``(N, H)``; ``top_k_index`` ``(N, K)`` the experts each token
    goes to, ``top_k_weights`` ``(N, K)`` their routing weights; ``gate_up`` and ``down`` are
    :class:`LoRAWeights` whose tensors carry a leading expert dim: ``weight`` ``(E, 2I, H)`` (gate
    rows then up rows) and ``(E, H, I)``, ``lora_a`` ``(E, r, in)``, ``lora_b`` ``(E, out, r)``.
    ``y[n] = sum_k w[n,k] * down_e(act(gate_e(x[n]), up_e(x[n])))`` with ``e = top_k_index[n, k]``,
    each expert's LoRA applied low-rank; ``y`` in ``x.dtype`` (the k-sum in fp32).
    An NF4 expert weight (``quant_state`` from ``quantize_nf4``) is unpacked a layer at a time where it
    fits the backend's budget (no row counts read back), else a group of experts at a time, in the
    forward and again in the backward.
``dequantize_nf4(packed, quant_state) -> W``
    bitsandbytes' NF4 layout (double-quantized absmax included) to ``quant_state.dtype``.
``quantize_nf4(weight, blocksize=64, double_quant=True) -> (packed, quant_state)``
    the inverse in the same layout, each row of ``weight``'s leading dim (an expert) in blocks of its
    own: packed ``(R, n / 2)`` uint8 and a state ``dequantize_nf4`` reads (with ``experts(packed,
    start, stop)`` to take a range of rows).
"""

from __future__ import annotations

import contextlib
import contextvars
import os
from collections.abc import Callable
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

OP_NAMES: tuple[str, ...] = (
    "rms_norm",
    "rope",
    "swiglu",
    "geglu",
    "linear_cross_entropy",
    "token_logprobs",
    "lora_linear",
    "lora_mlp",
    "lora_qkv",
    "lora_moe",
    "dequantize_nf4",
    "quantize_nf4",
)
"""The fixed set of kernel ops, with the signatures in this module's docstring.

.. versionadded:: 0.1
"""

REFERENCE_BACKEND = "reference"

FUSED_LOSS_ATTR = "ftengine_fused_loss"
"""Set to ``True`` on a causal-LM module whose forward computes the loss with
``linear_cross_entropy`` when given labels (a model adapter's patch does this). Trainers then take
the loss from the model's forward rather than building their own from logits."""


NF4_EXPERTS_ATTR = "ftengine_nf4_experts"
"""Set on a fused mixture-of-experts module whose expert weights ftengine stores NF4: a dict from the
parameter name (``gate_up_proj``, ``down_proj``) to ``(packed, quant_state)`` from ``quantize_nf4``.
The parameter itself is then a zero-stride stand-in of the original shape and dtype (what peft reads
to size its adapters); the weights are the packed ones, read by ``lora_moe`` and the exporters."""


_forward_generation = 0


def begin_forward() -> None:
    """Mark the start of a model's forward pass (model adapters call it from their patched forward).

    Backends may keep per-forward derived tensors, such as LoRA weights cast to the compute dtype
    once for the forward, its recomputation under checkpointing and its backward; a new forward
    makes them stale, whatever happened to the parameters in between.

    .. versionadded:: 0.1
    """
    global _forward_generation
    _forward_generation += 1


def forward_generation() -> int:
    """How many forwards :func:`begin_forward` has marked (a key for per-forward caches)."""
    return _forward_generation


_recomputing = contextvars.ContextVar("ftengine_recomputing", default=False)


@contextlib.contextmanager
def recomputation() -> Iterator[None]:
    """Mark code as a checkpointed layer's recomputation (gradient checkpointing calls it in the backward).

    A recomputation exists only to rebuild the tensors the layer's backward will read: its outputs
    are thrown away, and PyTorch stops it once the last tensor the backward needs is saved. An op
    whose saved tensors are ready before its output may therefore skip the rest of its work
    (:func:`recomputing`); the output it returns must still have the right shape and dtype.
    """
    token = _recomputing.set(True)
    try:
        yield
    finally:
        _recomputing.reset(token)


def recomputing() -> bool:
    """Whether the current code runs inside :func:`recomputation` with autograd recording."""
    return _recomputing.get() and torch.is_grad_enabled()


@dataclass
class LoRAWeights:
    """One LoRA-adapted linear layer, as the fused ops take it.

    Attributes:
        weight: the frozen base weight ``(out, in)``, 16-bit, or packed NF4 with ``quant_state``.
        lora_a: ``(r, in)``; ``None`` for a layer without an adapter.
        lora_b: ``(out, r)``.
        scaling: ``lora_alpha / r`` (or ``/ sqrt(r)`` for rsLoRA).
        bias: optional ``(out,)``.
        quant_state: bitsandbytes ``QuantState`` when ``weight`` is NF4-packed.

    .. versionadded:: 0.1
    """

    weight: torch.Tensor
    lora_a: torch.Tensor | None = None
    lora_b: torch.Tensor | None = None
    scaling: float = 1.0
    bias: torch.Tensor | None = None
    quant_state: Any = None


class KernelLookupError(LookupError):
    """An op name outside :data:`OP_NAMES`, or no backend (not even the reference) provides it."""


def _forced_backend() -> str | None:
    """``FTENGINE_KERNELS=reference`` (or another backend name) pins every op to one backend."""
    return os.environ.get("FTENGINE_KERNELS") or None


def resolve_op(name: str, backends: list[Any]) -> tuple[str, Callable[..., Any]]:
    """Pick the backend for one op.

    Args:
        name: one of :data:`OP_NAMES`.
        backends: registered backend objects.

    Returns:
        ``(backend_name, function)``: the highest-priority available backend implementing the op,
        else the reference backend's.

    Raises:
        KernelLookupError: unknown op, or nothing provides it.
    """
    if name not in OP_NAMES:
        raise KernelLookupError(f"unknown kernel op {name!r}; the ops are: {', '.join(OP_NAMES)}")
    forced = _forced_backend()
    candidates = sorted(backends, key=lambda b: -int(getattr(b, "priority", 0)))
    if forced:
        candidates = [b for b in candidates if b.name in (forced, REFERENCE_BACKEND)]
        candidates.sort(key=lambda b: b.name != forced)
    for backend in candidates:
        fn = getattr(backend, name, None)
        if fn is not None and backend.available():
            return backend.name, fn
    raise KernelLookupError(f"no kernel backend provides op {name!r} (is the 'reference' backend installed?)")


def get_op(name: str) -> Callable[..., Any]:
    """The best available implementation of kernel op ``name`` among the registered backends.

    .. versionadded:: 0.1
    """
    from ftengine.core.plugins import get_registry

    return resolve_op(name, list(get_registry("kernels").values()))[1]


def op_table() -> dict[str, str]:
    """Which backend each op resolves to right now: ``{op: backend_name}``."""
    from ftengine.core.plugins import get_registry

    backends = list(get_registry("kernels").values())
    table = {}
    for op in OP_NAMES:
        try:
            table[op] = resolve_op(op, backends)[0]
        except KernelLookupError:
            table[op] = "missing"
    return table
