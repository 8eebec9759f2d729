"""Shared pieces of the kernel tests: device, tolerances by dtype, poisoned allocations."""

from __future__ import annotations

import contextlib

import torch

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
ON_GPU = DEVICE.type == "cuda"
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# bf16 / fp16: ours may be this many times further from the fp32 truth than the reference's own run is
ERROR_FACTOR = {torch.bfloat16: 2.0, torch.float16: 2.0}
ERROR_FLOOR = {torch.float32: 1e-5, torch.bfloat16: 1e-3, torch.float16: 2e-4}


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """``||a - b|| / ||b||`` in fp64."""
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp(min=1e-30)).item()


def check(ours: torch.Tensor, ref_lowp: torch.Tensor, truth: torch.Tensor, dtype: torch.dtype, what: str) -> None:
    """Ours is finite, has the reference's shape and dtype, and is as close to the truth as the reference.

    Args:
        ours: the Triton op's result at ``dtype``.
        ref_lowp: the reference backend's result at ``dtype``.
        truth: the reference backend's result on exact fp32 copies of the same (rounded) inputs.
        dtype: the inputs' dtype.
        what: a name for the failure message.
    """
    assert ours.shape == ref_lowp.shape, f"{what}: shape {tuple(ours.shape)} != {tuple(ref_lowp.shape)}"
    assert ours.dtype == ref_lowp.dtype, f"{what}: dtype {ours.dtype} != {ref_lowp.dtype}"
    assert torch.isfinite(ours).all(), f"{what}: non-finite values (an unwritten element?)"
    e_ours = rel_err(ours, truth)
    if dtype == torch.float32:
        assert e_ours <= ERROR_FLOOR[dtype], f"{what}: relative error {e_ours:.2e} vs the fp32 reference"
        return
    e_ref = rel_err(ref_lowp, truth)
    bound = ERROR_FACTOR[dtype] * e_ref + ERROR_FLOOR[dtype]
    assert e_ours <= bound, f"{what}: relative error {e_ours:.2e} > {bound:.2e} (the reference's own: {e_ref:.2e})"


def _poison(t: torch.Tensor) -> torch.Tensor:
    if t.is_floating_point():
        t.fill_(float("nan"))
    elif t.dtype in (torch.int32, torch.int64):
        t.fill_(-(2**30))
    return t


@contextlib.contextmanager
def poisoned_allocations():
    """Every ``torch.empty`` / ``torch.empty_like`` inside comes back NaN-filled, so an unwritten element fails."""
    real_empty, real_empty_like = torch.empty, torch.empty_like

    def empty(*args, **kwargs):
        return _poison(real_empty(*args, **kwargs))

    def empty_like(*args, **kwargs):
        return _poison(real_empty_like(*args, **kwargs))

    torch.empty, torch.empty_like = empty, empty_like
    try:
        yield
    finally:
        torch.empty, torch.empty_like = real_empty, real_empty_like


def randn(shape, gen: torch.Generator, dtype: torch.dtype, scale: float = 1.0, shift: float = 0.0) -> torch.Tensor:
    """Fresh normal values on the test device, rounded to ``dtype`` (so an fp32 copy is exact), held in fp32."""
    return (torch.randn(shape, generator=gen) * scale + shift).to(dtype).to(DEVICE, torch.float32)


def leaf(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A fresh leaf copy at ``dtype`` that requires grad."""
    return t.detach().to(dtype).clone().requires_grad_(True)


def run_fwd_bwd(fn, inputs: list[torch.Tensor], grad_out, poison: bool = False):
    """Forward ``fn(*inputs)``, backward with ``grad_out``; returns (outputs, grads of the inputs)."""
    ctx = poisoned_allocations() if poison else contextlib.nullcontext()
    with ctx:
        out = fn(*inputs)
        outs = out if isinstance(out, tuple) else (out,)
        gos = grad_out if isinstance(grad_out, tuple) else (grad_out,)
        torch.autograd.backward(outs, [g.to(o.dtype) for g, o in zip(gos, outs, strict=False)])
    return outs, [t.grad for t in inputs]
