"""LM head fused with cross-entropy, in token chunks: the ``(N, V)`` logits never exist at once.

``linear_cross_entropy(hidden, lm_head_weight, labels)`` is the mean cross-entropy of
``hidden @ lm_head_weight.T`` over the labelled tokens. Everything happens in the forward: the
labelled rows (:mod:`.chunks`) are taken a chunk at a time, the chunk's logits are made and turned
into the loss and the gradients for a unit upstream gradient, and the chunk's buffer is reused.
The loss is a scalar, so the backward only scales the stored gradients by the incoming one
(:mod:`.scale`). Peak extra memory: one chunk of logits plus the gradients.

Three paths compute the same quantities; :func:`choose_path` picks one per call:

* ``epilogue`` (bf16 on Hopper and later, :mod:`.epilogue`): a Triton matmul writes the softmax's
  exponentials from its epilogue; nothing reads the logits back.
* ``one_pass`` (fp32, and bf16 where the epilogue cannot run, :mod:`.one_pass`): cuBLAS makes the
  logits and one pass per row turns them into the exponentials, under a shift that moves up if a
  later block of the row goes far above the first.
* ``two_pass`` (fp16, :mod:`.two_pass`): fp16's range cannot hold the exponentials under a shift
  fixed before the row's maximum is known, so a max / sum pass precedes a gradient pass.

:class:`~.chunks.Plan` holds the chunk size, the tile alignment and an optional forced path; the
op runs with :data:`DEFAULT_PLAN` unless :func:`planned` sets another (tests and benchmarks use it
to run every path at small chunk sizes).
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator

import torch

from ftengine.plugins.kernels.lm_head_ops import linear_cross_entropy_op
from ftengine.plugins.kernels.triton._op_registry import register_op
from ftengine.plugins.kernels.triton.linear_cross_entropy import epilogue
from ftengine.plugins.kernels.triton.linear_cross_entropy import exp_logits_matmul
from ftengine.plugins.kernels.triton.linear_cross_entropy import one_pass
from ftengine.plugins.kernels.triton.linear_cross_entropy import two_pass
from ftengine.plugins.kernels.triton.linear_cross_entropy.chunks import Plan
from ftengine.plugins.kernels.triton.linear_cross_entropy.chunks import Work
from ftengine.plugins.kernels.triton.linear_cross_entropy.scale import scaled_op

__all__ = ["DEFAULT_PLAN", "PATHS", "Plan", "choose_path", "fused_forward", "linear_cross_entropy", "planned"]

DEFAULT_PLAN = Plan()
PATHS = {"two_pass": two_pass.run, "one_pass": one_pass.run, "epilogue": epilogue.run}

_plan: contextvars.ContextVar[Plan] = contextvars.ContextVar("ftengine_lce_plan", default=DEFAULT_PLAN)


@contextlib.contextmanager
def planned(plan: Plan) -> Iterator[Plan]:
    """Run the op with ``plan`` (chunk size, tile rows, a forced path) inside the ``with`` block."""
    token = _plan.set(plan)
    try:
        yield plan
    finally:
        _plan.reset(token)


def choose_path(hidden: torch.Tensor, weight: torch.Tensor, plan: Plan = DEFAULT_PLAN) -> str:
    """The path for these operands: the plan's forced one, else ``two_pass`` for fp16, ``epilogue``
    where its matmul runs (:func:`.exp_logits_matmul.supported`: bf16, Hopper or later, aligned rows),
    ``one_pass`` otherwise.

    Raises:
        ValueError: the plan forces an unknown path, or ``epilogue`` for operands it cannot take.
    """
    if plan.path is not None:
        if plan.path not in PATHS:
            raise ValueError(f"linear_cross_entropy: unknown path {plan.path!r}; the paths are {', '.join(PATHS)}")
        if plan.path == "epilogue" and not exp_logits_matmul.supported(hidden, weight):
            raise ValueError("linear_cross_entropy: the epilogue path needs bf16 operands on Hopper or later")
        return plan.path
    if hidden.dtype == torch.float16:
        return "two_pass"
    return "epilogue" if exp_logits_matmul.supported(hidden, weight) else "one_pass"


def _dw_dtype(weight: torch.Tensor, hidden: torch.Tensor) -> torch.dtype:
    """``dL/dW`` accumulates in fp32 for an fp32 weight, else in the hidden dtype."""
    return torch.float32 if weight.dtype == torch.float32 else hidden.dtype


def fused_forward(
    hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, ignore_index: int, softcap: float | None,
    need_dh: bool, need_dw: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Loss (fp32 scalar) and, as asked, ``dL/dhidden`` and ``dL/dW`` for a unit upstream gradient.

    ``hidden`` is ``(N, H)`` and ``labels`` ``(N,)``, both contiguous; a gradient not asked for
    comes back as an empty tensor. No autograd. Runs with the current plan (:func:`planned`).
    """
    plan = _plan.get()
    w = weight.to(hidden.dtype).contiguous()
    dw = weight.new_empty(0)
    if need_dw:
        dw = torch.zeros(weight.shape, dtype=_dw_dtype(weight, hidden), device=weight.device)
    if hidden.shape[0] == 0:  # nothing to chunk
        dh = torch.zeros_like(hidden) if need_dh else hidden.new_empty(0)
        return hidden.new_zeros((), dtype=torch.float32), dh, dw
    path = choose_path(hidden, w, plan)
    # the two-pass path makes each chunk's logits itself; the others take their first chunk before the count
    work = Work(hidden, w, labels, ignore_index, softcap, need_dh, dw, speculate=path != "two_pass", plan=plan)
    PATHS[path](work)
    return work.losses.sum() / max(1, work.n_valid), work.dh, dw


def _fused_forward_fake(hidden, weight, labels, ignore_index, softcap, need_dh, need_dw):
    loss = hidden.new_empty((), dtype=torch.float32)
    dh = torch.empty_like(hidden) if need_dh else hidden.new_empty(0)
    dw = weight.new_empty(weight.shape, dtype=_dw_dtype(weight, hidden)) if need_dw else weight.new_empty(0)
    return loss, dh, dw


# the loss and both gradients in one opaque op: the compiler sees neither the launches nor the host sync
_fused_forward_op = register_op("linear_cross_entropy_forward", fused_forward, fake=_fused_forward_fake)


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, labels, ignore_index, softcap):
        need_dh, need_dw = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        loss, dh, dw = _fused_forward_op(hidden, weight, labels, ignore_index, softcap, need_dh, need_dw)
        ctx.save_for_backward(*(t for t, need in ((dh, need_dh), (dw, need_dw)) if need))
        ctx.has = (need_dh, need_dw)
        ctx.weight_dtype = weight.dtype
        return loss

    @staticmethod
    def backward(ctx, grad_out):
        saved = list(ctx.saved_tensors)
        dh = scaled_op(saved.pop(0), grad_out, None) if ctx.has[0] else None
        dw = scaled_op(saved.pop(0), grad_out, ctx.weight_dtype) if ctx.has[1] else None
        return dh, dw, None, None, None


linear_cross_entropy = linear_cross_entropy_op(_LinearCrossEntropy)
