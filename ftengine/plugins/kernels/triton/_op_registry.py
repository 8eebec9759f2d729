"""Registration of the Triton ops as ``torch.library`` custom ops, so ``torch.compile`` sees opaque ops.

Each op module registers the functions that launch its kernels as ``ftengine::<name>``, with a
fake implementation (shapes and dtypes only) for tracing, and its ``torch.autograd.Function``
calls those ops; the compiler then neither traces a Triton launch nor breaks the graph on host
code inside one (``linear_cross_entropy``'s wait for its count of labelled rows). The fused LoRA
ops are not registered: they take bitsandbytes ``QuantState`` objects and ``LoRAWeights``
dataclasses, which an op schema (tensors, scalars, strings, lists) cannot express. Nor are swiglu
and geglu: their backward writes into an optional buffer, and torch 2.11's in-place bookkeeping for
custom ops drops a ``None`` trailing argument before indexing the mutated ones (``IndexError`` on
CUDA; fixed in later torch).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from collections.abc import Iterable
from typing import Any

import torch

NAMESPACE = "ftengine"


def register_op(
    name: str, fn: Callable, fake: Callable | None = None, mutates_args: Iterable[str] = ()
) -> Callable:
    """``fn`` as the custom op ``ftengine::<name>``, traced through ``fake``; ``fn`` itself stays a plain function.

    The returned callable runs the op while ``torch.compile`` traces and ``fn`` directly otherwise:
    eagerly, the custom-op dispatch adds nothing but host time (on an H100 it was a third of a
    QLoRA micro-batch-1 step: hundreds of microseconds a call, one call per NF4 unpacking).

    Args:
        name: the op's name in the ``ftengine`` namespace.
        fn: the implementation; its annotations give the schema.
        fake: same parameters as ``fn``, returns empty tensors of the outputs' shapes, dtypes and strides;
            ``None`` for an op that returns nothing (it only writes into ``mutates_args``).
        mutates_args: the names of the parameters whose tensors ``fn`` writes into.

    Returns:
        A function with ``fn``'s parameters; the op itself is ``torch.ops.ftengine.<name>``.
    """
    op = torch.library.custom_op(f"{NAMESPACE}::{name}", fn, mutates_args=tuple(mutates_args))
    op.register_fake(fake or _returns_nothing)

    @functools.wraps(fn)
    def call(*args: Any) -> Any:
        if torch.compiler.is_compiling():
            return op(*args)
        return fn(*args)

    return call


def _returns_nothing(*args, **kwargs) -> None:
    return None
