"""The Triton ops as ``torch.library`` custom ops: each registered op passes ``opcheck``, and
``torch.compile(fullgraph=True)`` of a function calling the public op (any graph break fails it)
traces the ops as opaque nodes and matches the eager op, forward and backward.
"""

import pytest
import torch
from torch._dynamo.testing import AotEagerAndRecordGraphs

from ftengine.plugins.kernels.triton.dequantize_nf4 import dequantize_nf4
from ftengine.plugins.kernels.triton.linear_cross_entropy import linear_cross_entropy
from ftengine.plugins.kernels.triton.rms_norm import rms_norm
from ftengine.plugins.kernels.triton.rope import rope

from .helpers import DEVICE

OPS = torch.ops.ftengine
# AotEagerAndRecordGraphs is aot_eager plus a record of the graphs; its compilers take unboxed arguments
pytestmark = pytest.mark.filterwarnings("ignore:Your compiler for AOTAutograd is returning a function:UserWarning")


def _r(*shape: int) -> torch.Tensor:
    return torch.randn(shape, device=DEVICE)


def _labels(n: int, vocab: int, ignored: tuple[int, ...] = (1, 4)) -> torch.Tensor:
    labels = torch.randint(0, vocab, (n,), device=DEVICE)
    labels[list(ignored)] = -100
    return labels


# op, then a function making its arguments. Every argument is a plain tensor that does not require
# grad: the ops are the kernel launches inside each op's autograd.Function, always called with
# grad mode off, and register no autograd formula of their own (test_aot_dispatch_dynamic would
# try to differentiate through them). All of opcheck's default checks apply, the mutating
# backward ops included: test_schema fails on a write the schema does not declare, and
# test_faketensor / test_aot_dispatch_dynamic run the writes functionalized.
OPCHECK_CASES = {
    "rms_norm_forward": (OPS.rms_norm_forward, lambda: (_r(6, 33), _r(33), 1e-6, 1.0)),
    "rms_norm_backward": (OPS.rms_norm_backward, lambda: (_r(6, 33), _r(6, 33), _r(33), _r(6).abs() + 0.5, 1.0, True)),
    "rms_norm_backward_no_dw": (OPS.rms_norm_backward, lambda: (_r(6, 33), _r(6, 33), _r(33), _r(6).abs(), 0.0, False)),
    # q in the (B, T, H, D) -> (B, H, T, D) transposed layout, cos/sin broadcast over the batch (stride 0)
    "rope_rotate": (OPS.rope_rotate, lambda: (_r(2, 5, 3, 8).transpose(1, 2), _r(2, 2, 5, 8),
                                              _r(5, 8).expand(2, 5, 8), _r(1, 5, 8).expand(2, 5, 8), False)),
    "rope_rotate_backward": (OPS.rope_rotate, lambda: (_r(2, 3, 5, 8), _r(2, 2, 5, 8), _r(2, 5, 8), _r(2, 5, 8), True)),
    "linear_cross_entropy_forward": (OPS.linear_cross_entropy_forward,
                                     lambda: (_r(10, 16), _r(40, 16), _labels(10, 40), -100, 3.0, True, True)),
    "linear_cross_entropy_forward_no_grads": (OPS.linear_cross_entropy_forward,
                                              lambda: (_r(10, 16), _r(40, 16), _labels(10, 40), -100, None, False,
                                                       False)),
    "linear_cross_entropy_forward_all_ignored": (OPS.linear_cross_entropy_forward,
                                                 lambda: (_r(4, 16), _r(40, 16), _labels(4, 40, (0, 1, 2, 3)), -100,
                                                          None, True, True)),
    "linear_cross_entropy_scale": (OPS.linear_cross_entropy_scale, lambda: (_r(10, 16), _r(), None)),
    "linear_cross_entropy_scale_to_bf16": (OPS.linear_cross_entropy_scale, lambda: (_r(40, 16), _r(), torch.bfloat16)),
}


@pytest.mark.parametrize("case", OPCHECK_CASES)
def test_opcheck(case):
    torch.manual_seed(0)
    op, make_args = OPCHECK_CASES[case]
    torch.library.opcheck(op, make_args())


def _nf4(nested: bool):
    bnb_functional = pytest.importorskip("bitsandbytes.functional")
    w = (torch.randn(8, 96, generator=torch.Generator().manual_seed(0)) * 0.05).to(torch.bfloat16).to(DEVICE)
    return bnb_functional.quantize_4bit(w, quant_type="nf4", compress_statistics=nested, blocksize=64)


@pytest.mark.parametrize("nested", [True, False])
def test_opcheck_dequantize_nf4(nested):
    packed, state = _nf4(nested)
    if nested:
        s2 = state.state2
        offset = torch.as_tensor(state.offset, dtype=torch.float32, device=DEVICE)
        args = (packed, state.absmax, s2.code, s2.absmax, offset, state.blocksize, s2.blocksize)
    else:
        args = (packed, state.absmax, None, None, None, state.blocksize, 1)
    torch.library.opcheck(OPS.dequantize_nf4, (*args, list(state.shape), state.dtype))


def _compiled_matches_eager(fn, inputs: list[torch.Tensor], ops: tuple[str, ...]) -> None:
    """``fn`` compiled whole (aot_eager) gives the eager outputs and input gradients, with ``ops`` opaque in its graphs.

    Floating-point inputs get gradients; every output gets a random upstream gradient.
    """
    torch._dynamo.reset()
    backend = AotEagerAndRecordGraphs()
    compiled = torch.compile(fn, fullgraph=True, backend=backend)
    results = []
    for f in (fn, compiled):
        args = [t.detach().clone().requires_grad_(t.is_floating_point()) for t in inputs]
        outs = f(*args)
        outs = outs if isinstance(outs, tuple) else (outs,)
        torch.manual_seed(1)
        grad_outs = [torch.randn_like(o) for o in outs]
        torch.autograd.backward(outs, grad_outs)
        results.append((outs, [a.grad for a in args if a.requires_grad]))
    (eager_outs, eager_grads), (compiled_outs, compiled_grads) = results
    torch.testing.assert_close(compiled_outs, eager_outs)
    torch.testing.assert_close(compiled_grads, eager_grads)
    code = "\n".join(g.code for g in backend.fw_graphs + backend.bw_graphs)
    for name in ops:
        assert f"torch.ops.ftengine.{name}.default" in code, f"{name} is not an op in the compiled graphs"


# The inputs go through an ordinary op first, so the kernel ops see intermediates: eager, the
# gated activations' backward then writes the gradients over its saved inputs; compiled, it
# writes into buffers of its own (the compiler functionalizes the write), and the results agree.


def test_compile_rms_norm():
    torch.manual_seed(0)
    _compiled_matches_eager(lambda x, w: rms_norm(x * 2, w, 1e-6, offset=1.0), [_r(2, 3, 33), _r(33)],
                            ("rms_norm_forward", "rms_norm_backward"))


def test_compile_rope():
    torch.manual_seed(0)

    def fn(q, k, cos, sin):
        return rope(q.transpose(1, 2), k * 1, cos, sin)  # q read through its strides, as from a view

    _compiled_matches_eager(fn, [_r(2, 5, 3, 8), _r(2, 2, 5, 8), _r(5, 8), _r(5, 8)], ("rope_rotate",))


@pytest.mark.parametrize("softcap", [None, 5.0])
def test_compile_linear_cross_entropy(softcap):
    torch.manual_seed(0)

    def fn(hidden, weight, labels):
        return linear_cross_entropy(hidden * 1, weight, labels, softcap=softcap)

    _compiled_matches_eager(fn, [_r(2, 5, 16), _r(40, 16), _labels(10, 40).view(2, 5)],
                            ("linear_cross_entropy_forward", "linear_cross_entropy_scale"))


@pytest.mark.parametrize("nested", [True, False])
def test_compile_dequantize_nf4(nested):
    # forward only: the packed uint8 weight gets no gradient
    packed, state = _nf4(nested)
    torch._dynamo.reset()
    backend = AotEagerAndRecordGraphs()
    compiled = torch.compile(lambda p: dequantize_nf4(p, state), fullgraph=True, backend=backend)
    assert torch.equal(compiled(packed), dequantize_nf4(packed, state))
    assert "torch.ops.ftengine.dequantize_nf4.default" in backend.fw_graphs[0].code
