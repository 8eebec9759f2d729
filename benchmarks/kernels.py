"""Kernel benchmarks: each op's forward+backward time and peak memory, Triton vs the baselines.

Run on a GPU: ``python benchmarks/kernels.py --out kernels.md``. For every op, at Llama-3.1-8B and
Qwen2.5-7B shapes in bf16, it times forward+backward with ``triton.testing.do_bench`` (median)
and measures the peak memory allocated above the inputs, for the ``triton`` backend, the
``reference`` backend eager and under ``torch.compile``, Liger-Kernel where it has the op, and
plain PyTorch / PEFT / bitsandbytes where those are the usual path. Memory-bound ops also report
their bandwidth as a share of a device-to-device copy measured in the same run. The table is
printed and written as markdown.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import importlib
import importlib.metadata
import subprocess
import time
from collections.abc import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F
import triton
from triton.testing import do_bench
from triton.testing import do_bench_cudagraph

from ftengine.core.kernels import LoRAWeights
from ftengine.plugins.kernels import reference
from ftengine.plugins.kernels.triton import TritonBackend

TRITON = TritonBackend()
DT = torch.bfloat16
DEV = "cuda"
GIB = 1024**3
ROWS: list[dict] = []


def optional(name: str):
    try:
        return importlib.import_module(name)
    except Exception:  # noqa: BLE001 - any import failure means the baseline is absent
        return None


liger_ops = {n: optional(f"liger_kernel.ops.{n}") for n in ("rms_norm", "swiglu", "geglu", "rope")}
liger_flce = optional("liger_kernel.transformers.fused_linear_cross_entropy")
bnb = optional("bitsandbytes")
peft = optional("peft")


def copy_bandwidth() -> float:
    """Bytes read plus written per second by a 1 GiB device-to-device copy."""
    src = torch.randn(GIB // 2, dtype=DT, device=DEV)
    dst = torch.empty_like(src)
    ms = do_bench(lambda: dst.copy_(src), warmup=25, rep=200, return_mode="median")
    return 2 * GIB / (ms * 1e-3)


def graph_ms(step: Callable[[], object], rep: int) -> float | None:
    """Median ms of CUDA-graph replays of ``step`` (no launch or Python overhead), None if it cannot be captured."""
    try:
        return do_bench_cudagraph(step, rep=rep, return_mode="median")
    except Exception:  # noqa: BLE001 - some baselines sync with the host or allocate in ways a graph cannot hold
        torch.cuda.synchronize()
        return None


def measure(step: Callable[[], object], rep: int = 100, graph: bool = True) -> tuple[float, float, float | None]:
    """(median ms, peak GiB allocated above what existed before, median ms as a CUDA graph) of ``step``."""
    step()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    step()
    torch.cuda.synchronize()
    peak = (torch.cuda.max_memory_allocated() - base) / GIB
    ms = do_bench(step, warmup=25, rep=rep, return_mode="median")
    return ms, peak, graph_ms(step, rep) if graph else None


def fwd_bwd(fn: Callable, inputs: list[torch.Tensor], grads_out, wrt: list[torch.Tensor] | None = None) -> Callable:
    """A closure running ``fn(*inputs)`` and the gradients w.r.t. ``wrt`` (default: inputs needing grad)."""
    wrt = wrt if wrt is not None else [t for t in inputs if t.requires_grad]

    def step():
        out = fn(*inputs)
        outs = out if isinstance(out, tuple) else (out,)
        gos = grads_out if isinstance(grads_out, tuple) else (grads_out,)
        torch.autograd.grad(outs, wrt, gos)

    return step


def record(op: str, shape: str, provider: str, make_step: Callable[[], Callable], bytes_moved: int = 0,
           bw: float = 0.0, rep: int = 100, saved: Callable[[], float] | None = None, graph: bool = True) -> None:
    row = {"op": op, "shape": shape, "provider": provider}
    try:
        step = make_step()
        ms, peak, g_ms = measure(step, rep, graph)
        row.update(ms=ms, peak=peak, graph=g_ms)
        if bytes_moved and bw:
            row["bw"] = 100.0 * bytes_moved / (min(ms, g_ms or ms) * 1e-3) / bw
        if saved is not None:
            row["saved"] = saved()
    except Exception as err:  # noqa: BLE001 - a failed baseline is reported in its row, the run goes on
        row["error"] = f"{type(err).__name__}: {str(err).splitlines()[0][:90]}"
    torch.cuda.empty_cache()
    ROWS.append(row)
    print(format_row(row), flush=True)


def format_row(r: dict) -> str:
    if "error" in r:
        return f"| {r['op']} | {r['shape']} | {r['provider']} | - | - | - | - | - | {r['error']} |"
    bw = f"{r['bw']:.0f}%" if "bw" in r else ""
    saved = f"{r['saved']:.1f}" if "saved" in r else ""
    g_ms = f"{r['graph']:.3f}" if r.get("graph") else "-"
    return (f"| {r['op']} | {r['shape']} | {r['provider']} | {r['ms']:.3f} | {g_ms} | {r['peak']:.3f} | {saved} | {bw} "
            f"| {r.get('note', '')} |")


def compiled(fn: Callable) -> Callable:
    return torch.compile(fn, dynamic=False)


def randn(*shape, grad: bool = False, scale: float = 1.0) -> torch.Tensor:
    return (torch.randn(*shape, device=DEV, dtype=DT) * scale).requires_grad_(grad)


def bench_rms_norm(bw: float) -> None:
    for name, hidden in (("llama", 4096), ("qwen", 3584)):
        _rms_norm_case(bw, name, hidden)


def _rms_norm_case(bw: float, name: str, hidden: int) -> None:
    n = 8192
    shape = f"{n}x{hidden} ({name})"
    moved = 5 * n * hidden * 2
    x, w, dy = randn(n, hidden, grad=True), randn(hidden, grad=True), randn(n, hidden)
    ref_c = compiled(reference.rms_norm)
    providers = {
        "triton": lambda: fwd_bwd(lambda a, b: TRITON.rms_norm(a, b, 1e-6), [x, w], dy),
        "reference": lambda: fwd_bwd(lambda a, b: reference.rms_norm(a, b, 1e-6), [x, w], dy),
        "reference compiled": lambda: fwd_bwd(lambda a, b: ref_c(a, b, 1e-6), [x, w], dy),
    }
    if liger_ops["rms_norm"]:
        fn = liger_ops["rms_norm"].LigerRMSNormFunction.apply
        providers["liger"] = lambda: fwd_bwd(lambda a, b: fn(a, b, 1e-6, 0.0, "llama", False), [x, w], dy)
    for provider, make in providers.items():
        record("rms_norm", shape, provider, make, moved, bw)


def bench_gated(bw: float, op: str) -> None:
    sizes = (("llama", 14336), ("qwen", 18944)) if op == "swiglu" else (("llama", 14336),)
    for name, inter in sizes:
        _gated_case(bw, op, name, inter)


def _gated_case(bw: float, op: str, name: str, inter: int) -> None:
    n = 8192
    shape = f"{n}x{inter} ({name})"
    moved = 8 * n * inter * 2
    gl, ul, dy = randn(n, inter, grad=True), randn(n, inter, grad=True), randn(n, inter)
    # the op sees intermediates, as in a model (views of leaves: no extra memory)
    ours = TRITON.swiglu if op == "swiglu" else TRITON.geglu
    ref = reference.swiglu if op == "swiglu" else reference.geglu
    ref_c = compiled(ref)
    providers = {
        "triton": lambda: fwd_bwd(lambda a, b: ours(a.view_as(a), b.view_as(b)), [gl, ul], dy),
        "reference": lambda: fwd_bwd(lambda a, b: ref(a, b), [gl, ul], dy),
        "reference compiled": lambda: fwd_bwd(lambda a, b: ref_c(a, b), [gl, ul], dy),
    }
    if op == "swiglu" and liger_ops["swiglu"]:
        fn = liger_ops["swiglu"].LigerSiLUMulFunction.apply
        providers["liger"] = lambda: fwd_bwd(lambda a, b: fn(a.view_as(a), b.view_as(b)), [gl, ul], dy)
    if op == "geglu" and liger_ops["geglu"]:
        fn = liger_ops["geglu"].LigerGELUMulFunction.apply
        providers["liger"] = lambda: fwd_bwd(lambda a, b: fn(a.view_as(a), b.view_as(b)), [gl, ul], dy)
    for provider, make in providers.items():
        record(op, shape, provider, make, moved, bw)


def bench_rope(bw: float) -> None:
    for name, hq, hk in (("llama", 32, 8), ("qwen", 28, 4)):
        _rope_case(bw, name, hq, hk)


def _rope_case(bw: float, name: str, hq: int, hk: int) -> None:
    b, t, d = 4, 2048, 128
    shape = f"q {b}x{hq}x{t}x{d} k {b}x{hk}x{t}x{d} ({name})"
    moved = 4 * b * t * d * (hq + hk) * 2
    # as attention produces them: (B, T, H, D) projections viewed as (B, H, T, D)
    ql = randn(b, t, hq, d, grad=True)
    kl = randn(b, t, hk, d, grad=True)
    dq, dk = randn(b, hq, t, d), randn(b, hk, t, d)
    ang = torch.rand(1, t, d // 2, device=DEV) * 100
    cos = torch.cat((ang, ang), -1).cos().to(DT)
    sin = torch.cat((ang, ang), -1).sin().to(DT)
    ref_c = compiled(reference.rope)

    def with_view(fn):
        return lambda a, c: fn(a.transpose(1, 2), c.transpose(1, 2), cos, sin)

    providers = {
        "triton": lambda: fwd_bwd(with_view(TRITON.rope), [ql, kl], (dq, dk)),
        "reference": lambda: fwd_bwd(with_view(reference.rope), [ql, kl], (dq, dk)),
        "reference compiled": lambda: fwd_bwd(with_view(ref_c), [ql, kl], (dq, dk)),
    }
    if liger_ops["rope"]:
        fn = liger_ops["rope"].LigerRopeFunction.apply
        providers["liger"] = lambda: fwd_bwd(with_view(fn), [ql, kl], (dq, dk))
    for provider, make in providers.items():
        record("rope", shape, provider, make, moved, bw)


def bench_linear_cross_entropy() -> None:
    for name, hidden, vocab in (("llama", 4096, 128256), ("qwen", 3584, 152064)):
        _lce_case(name, hidden, vocab)


def _lce_case(name: str, hidden: int, vocab: int) -> None:
    n = 8192
    shape = f"{n} tok {hidden}->{vocab} ({name})"
    h = randn(n, hidden, grad=True)
    w = randn(vocab, hidden, scale=0.02)  # frozen LM head (LoRA)
    labels = torch.randint(0, vocab, (n,), device=DEV)
    labels[:500] = -100
    one = torch.tensor(1.0, device=DEV)

    def plain(a, b):
        return F.cross_entropy((a @ b.t()).float(), labels)

    plain_c = compiled(plain)

    providers = {
        "triton": lambda: fwd_bwd(lambda a: TRITON.linear_cross_entropy(a, w, labels), [h], one),
        "reference": lambda: fwd_bwd(lambda a: reference.linear_cross_entropy(a, w, labels), [h], one),
        "torch eager (full logits)": lambda: fwd_bwd(lambda a: plain(a, w), [h], one),
        "torch.compile (full logits)": lambda: fwd_bwd(lambda a: plain_c(a, w), [h], one),
    }
    if liger_flce:
        loss_mod = liger_flce.LigerFusedLinearCrossEntropyLoss()
        providers["liger"] = lambda: fwd_bwd(lambda a: loss_mod(w, a, labels), [h], one)
    for provider, make in providers.items():
        record("linear_cross_entropy", shape, provider, make, rep=400, graph=False)


def bench_dequantize_nf4(bw: float) -> None:
    if bnb is None:
        return
    for rows, cols in ((14336, 4096), (18944, 3584)):
        _nf4_case(bw, rows, cols)


def _nf4_case(bw: float, rows: int, cols: int) -> None:
    import bitsandbytes.functional as bnbf

    shape = f"{rows}x{cols}"
    packed, state = bnbf.quantize_4bit(randn(rows, cols, scale=0.02), quant_type="nf4", compress_statistics=True)
    moved = rows * cols // 2 + rows * cols * 2
    ref_c = compiled(reference.dequantize_nf4)
    providers = {
        "triton": lambda: (lambda: TRITON.dequantize_nf4(packed, state)),
        "bitsandbytes": lambda: (lambda: bnbf.dequantize_4bit(packed, state)),
        "reference": lambda: (lambda: reference.dequantize_nf4(packed, state)),
        "reference compiled": lambda: (lambda: ref_c(packed, state)),
    }
    for provider, make in providers.items():
        # the reference reads the absmax offset on the host: no graph capture
        record("dequantize_nf4 (fwd)", shape, provider, make, moved, bw, graph=not provider.startswith("reference"))


class _MLP(nn.Module):
    def __init__(self, make_linear: Callable, hidden: int, inter: int):
        super().__init__()
        self.gate_proj = make_linear(hidden, inter)
        self.up_proj = make_linear(hidden, inter)
        self.down_proj = make_linear(inter, hidden)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class _QKV(nn.Module):
    def __init__(self, make_linear: Callable, hidden: int, kv: int):
        super().__init__()
        self.q_proj = make_linear(hidden, hidden)
        self.k_proj = make_linear(hidden, kv)
        self.v_proj = make_linear(hidden, kv)

    def forward(self, x):
        return self.q_proj(x), self.k_proj(x), self.v_proj(x)


def _linear_factory(nf4: bool) -> Callable:
    def make(d_in, d_out):
        w = torch.randn(d_out, d_in, dtype=DT) / d_in**0.5
        if nf4:
            layer = bnb.nn.Linear4bit(d_in, d_out, bias=False, compute_dtype=DT, quant_type="nf4",
                                      compress_statistics=True)
            layer.weight = bnb.nn.Params4bit(w, requires_grad=False, quant_type="nf4", compress_statistics=True)
        else:
            layer = nn.Linear(d_in, d_out, bias=False, dtype=DT)
            layer.weight.data.copy_(w)
        return layer.to(DEV)

    return make


def _lora_weights(module) -> LoRAWeights:
    base = module.base_layer.weight
    quant_state = getattr(base, "quant_state", None)
    return LoRAWeights(
        weight=base.data if quant_state is not None else base,
        lora_a=module.lora_A["default"].weight,
        lora_b=module.lora_B["default"].weight,
        scaling=module.scaling["default"],
        quant_state=quant_state,
    )


def _saved_after_forward(fn: Callable, x: torch.Tensor) -> Callable[[], float]:
    """MiB held after the forward beyond its outputs: the activations saved for the backward."""

    def saved():
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        out = fn(x)
        outs = out if isinstance(out, tuple) else (out,)
        held = torch.cuda.memory_allocated() - base - sum(o.numel() * o.element_size() for o in outs)
        del out, outs
        return held / 2**20

    return saved


def bench_lora(kind: str) -> None:
    if peft is None:
        return
    for nf4 in (False, True):
        if not nf4 or bnb is not None:
            _lora_case(kind, nf4)


def _lora_case(kind: str, nf4: bool) -> None:
    from peft import LoraConfig
    from peft import inject_adapter_in_model

    hidden, inter, kv, n, r = 4096, 14336, 1024, 8192, 16
    make = _linear_factory(nf4)
    model = _MLP(make, hidden, inter) if kind == "mlp" else _QKV(make, hidden, kv)
    targets = ["gate_proj", "up_proj", "down_proj"] if kind == "mlp" else ["q_proj", "k_proj", "v_proj"]
    model = inject_adapter_in_model(LoraConfig(r=r, lora_alpha=32, lora_dropout=0.0, target_modules=targets),
                                    model)
    for p_name, p in model.named_parameters():
        p.requires_grad_("lora_" in p_name)
        if "lora_B" in p_name:
            p.data.normal_(0, 0.02)  # non-zero B, as after some training
    layers = [_lora_weights(getattr(model, t)) for t in targets]
    params = [p for p in model.parameters() if p.requires_grad]
    x = randn(n, hidden, grad=True)
    adapter_dtype = str(layers[0].lora_a.dtype).removeprefix("torch.")
    shape = f"{n} tok, llama-3.1-8b, r={r}, {'nf4' if nf4 else 'bf16'} base, {adapter_dtype} adapters"
    if kind == "mlp":
        dys = randn(n, hidden)

        def ours(a):
            return TRITON.lora_mlp(a, *layers, activation="swiglu")

        def ref(a):
            return reference.lora_mlp(a, *layers, activation="swiglu")
    else:
        dys = (randn(n, hidden), randn(n, kv), randn(n, kv))

        def ours(a):
            return TRITON.lora_qkv(a, *layers)

        def ref(a):
            return reference.lora_qkv(a, *layers)

    for provider, fn in (("triton", ours), ("peft", model), ("reference", ref)):
        record(f"lora_{kind}", shape, provider, functools.partial(fwd_bwd, fn, [x], dys, [x, *params]),
               saved=_saved_after_forward(fn, x), graph=False)


TUNE_SWEEPS = ("rms_norm", "rope", "dequantize_nf4", "lm_head")


def _routed_rows(tokens: int, experts: int, top_k: int) -> tuple[torch.Tensor, int]:
    """The running row counts per expert of ``tokens`` routed to ``top_k`` of ``experts`` at random."""
    choice = torch.rand(tokens, experts, device=DEV).topk(top_k, dim=-1).indices.reshape(-1)
    counts = torch.zeros(experts, dtype=torch.int64, device=DEV).scatter_add_(0, choice, torch.ones_like(choice))
    return counts.cumsum(0).to(torch.int32), tokens * top_k


def nf4_expert_case(shape: tuple[int, int, int]) -> tuple:
    """``(x, packed, state, offsets, dy)`` of one Qwen3-30B-A3B expert projection at micro-batch 1, seq 2048."""
    offsets, rows = _routed_rows(2048, shape[0], 8)
    packed, state = reference.quantize_nf4(randn(*shape, scale=0.02))
    return randn(rows, shape[2], grad=True), packed, state, offsets, randn(rows, shape[1])


NF4_EXPERT_SHAPES = {"gate_up 128x1536x2048": (128, 1536, 2048), "down 128x2048x768": (128, 2048, 768)}


def bench_nf4_experts() -> None:
    """Grouped GEMM over NF4 experts (fwd + input gradient): a layer's experts unpacked, then torch's grouped GEMM
    (the Triton ``lora_moe``'s path), against the same GEMM on bf16 weights."""
    from ftengine.plugins.kernels.triton import lora_moe as moe_mod

    for name, shape in NF4_EXPERT_SHAPES.items():
        x, packed, state, offsets, dy = nf4_expert_case(shape)
        weight = TRITON.dequantize_nf4(packed, state)
        providers = {
            "triton dequantize_nf4 + torch._grouped_mm": lambda: fwd_bwd(
                lambda a: reference.nf4_grouped_linear(a, packed, state, offsets, moe_mod.grouped_linear,  # noqa: B023
                                                       TRITON.dequantize_nf4), [x], dy),  # noqa: B023
            "bf16 weights, torch._grouped_mm": lambda: fwd_bwd(
                lambda a: reference.grouped_linear(a, weight, offsets), [x], dy),  # noqa: B023
        }
        for provider, make in providers.items():
            record("nf4 experts (fwd+dx)", name, provider, make)


def tune(sweeps: list[str]) -> list[str]:
    """Launch-parameter sweeps of the Triton ops (CUDA-graph medians), printed as lines of text."""
    from ftengine.plugins.kernels.triton import dequantize_nf4 as nf4_mod
    from ftengine.plugins.kernels.triton import linear_cross_entropy as lce_mod
    from ftengine.plugins.kernels.triton import rms_norm as rms_mod
    from ftengine.plugins.kernels.triton import rope as rope_mod

    lines = []

    def emit(text: str) -> None:
        lines.append(text)
        print(text, flush=True)

    if "rms_norm" in sweeps:
        _tune_rms_norm(emit, rms_mod)
    if "rope" in sweeps:
        _tune_rope(emit, rope_mod)
    if "dequantize_nf4" in sweeps:
        _tune_nf4(emit, nf4_mod)
    if "lm_head" in sweeps:
        _tune_lm_head(emit, lce_mod)
    return lines


def _tune_rms_norm(emit, rms_mod) -> None:
    x, w, dy = randn(8192, 4096, grad=True), randn(4096, grad=True), randn(8192, 4096)
    emit(f"rms_norm fwd only: {graph_ms(lambda: TRITON.rms_norm(x.detach(), w.detach(), 1e-6), 100):.4f} ms")
    for per_sm in (1, 2, 4, 8, 16):
        rms_mod.PROGRAMS_PER_SM = per_sm
        step = fwd_bwd(lambda a, b: TRITON.rms_norm(a, b, 1e-6), [x, w], dy)
        emit(f"rms_norm fwd+bwd, backward programs/SM {per_sm}: {graph_ms(step, 100):.4f} ms")
    rms_mod.PROGRAMS_PER_SM = 2


def _tune_rope(emit, rope_mod) -> None:
    ql, kl = randn(4, 2048, 32, 128, grad=True), randn(4, 2048, 8, 128, grad=True)
    dq, dk = randn(4, 32, 2048, 128), randn(4, 8, 2048, 128)
    ang = torch.rand(1, 2048, 64, device=DEV) * 100
    cos, sin = torch.cat((ang, ang), -1).cos().to(DT), torch.cat((ang, ang), -1).sin().to(DT)
    for warps in (1, 2, 4, 8, 16):
        rope_mod.NUM_WARPS = warps
        fwd = graph_ms(lambda: TRITON.rope(ql.detach().transpose(1, 2), kl.detach().transpose(1, 2), cos, sin), 100)
        step = fwd_bwd(lambda a, c: TRITON.rope(a.transpose(1, 2), c.transpose(1, 2), cos, sin), [ql, kl], (dq, dk))
        emit(f"rope warps {warps}: fwd {fwd:.4f} ms, fwd+bwd {graph_ms(step, 100):.4f} ms")
    rope_mod.NUM_WARPS = 0


def _tune_nf4(emit, nf4_mod) -> None:
    import bitsandbytes.functional as bnbf

    packed, state = bnbf.quantize_4bit(randn(14336, 4096, scale=0.02), quant_type="nf4", compress_statistics=True)
    for per_prog in (256, 512, 1024, 2048, 4096):
        for warps in (2, 4, 8):
            nf4_mod.BYTES_PER_PROGRAM, nf4_mod.NUM_WARPS = per_prog, warps
            ms = graph_ms(lambda: TRITON.dequantize_nf4(packed, state), 100)
            emit(f"dequantize_nf4 bytes/program {per_prog} warps {warps}: {ms:.4f} ms")
    nf4_mod.BYTES_PER_PROGRAM, nf4_mod.NUM_WARPS = 1024, 2


def _tune_lm_head(emit, lce_mod) -> None:
    hidden, vocab = 3584, 152064
    h = randn(8192, hidden, grad=True)
    wl = randn(vocab, hidden, scale=0.02)
    labels = torch.randint(0, vocab, (8192,), device=DEV)
    labels[:500] = -100
    one = torch.tensor(1.0, device=DEV)
    for rows in (512, 768, 1024, 1152, 1280, 1536, 2048):
        hs = h.detach()[:rows]
        logits = hs @ wl.t()
        t1 = do_bench(lambda: hs @ wl.t(), rep=100, return_mode="median")  # noqa: B023
        t2 = do_bench(lambda: logits @ wl, rep=100, return_mode="median")  # noqa: B023
        flop = 2 * rows * hidden * vocab
        emit(f"lm-head GEMMs at {rows} rows: logits {flop / t1 / 1e9:.0f} TFLOP/s, dh {flop / t2 / 1e9:.0f} TFLOP/s")
    for path in ("epilogue", "one_pass"):
        for mib in (128, 256, 368, 448):
            with lce_mod.planned(lce_mod.Plan(chunk_bytes=mib * 1024 * 1024, path=path)):
                step = fwd_bwd(lambda a: TRITON.linear_cross_entropy(a, wl, labels), [h], one)
                ms, peak, _ = measure(step, 150, graph=False)
            emit(f"linear_cross_entropy qwen (500 of 8192 tokens ignored) {path} chunk {mib} MiB: {ms:.3f} ms, "
                 f"peak {peak:.3f} GiB")


def version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "absent"


def device_line() -> str:
    try:
        return subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"],
                              capture_output=True, text=True, timeout=30).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return torch.cuda.get_device_name()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="kernels.md", help="markdown file to write")
    parser.add_argument("--ops", default="rms_norm,swiglu,geglu,rope,linear_cross_entropy,dequantize_nf4,lora_mlp,"
                        "lora_qkv,nf4_experts", help="comma-separated ops to run")
    parser.add_argument("--tune", nargs="?", const=",".join(TUNE_SWEEPS), default="",
                        help=f"run launch-parameter sweeps first (all, or a comma-separated subset of {TUNE_SWEEPS})")
    args = parser.parse_args()
    torch.manual_seed(0)
    ops = args.ops.split(",")
    header = [
        f"device: {device_line()}",
        f"torch {torch.__version__}, triton {triton.__version__}, "
        f"liger-kernel {version('liger-kernel')}, bitsandbytes {version('bitsandbytes')}, peft {version('peft')}",
        f"date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC; bf16; "
        "fwd+bwd median of triton.testing.do_bench",
    ]
    bw = copy_bandwidth()
    header.append(f"device-to-device copy: {bw / 1e12:.2f} TB/s (read + write)")
    print("\n".join(header), flush=True)
    table_head = ["| op | shape | provider | ms (median) | ms (CUDA graph) | peak GiB | saved MiB | % copy BW | note |",
                  "|---|---|---|---|---|---|---|---|---|"]
    tuned = tune(args.tune.split(",")) if args.tune else []
    print("\n".join(table_head), flush=True)
    start = time.time()
    runners = {
        "rms_norm": lambda: bench_rms_norm(bw),
        "swiglu": lambda: bench_gated(bw, "swiglu"),
        "geglu": lambda: bench_gated(bw, "geglu"),
        "rope": lambda: bench_rope(bw),
        "linear_cross_entropy": bench_linear_cross_entropy,
        "dequantize_nf4": lambda: bench_dequantize_nf4(bw),
        "lora_mlp": lambda: bench_lora("mlp"),
        "lora_qkv": lambda: bench_lora("qkv"),
        "nf4_experts": bench_nf4_experts,
    }
    for op in ops:
        runners[op]()
        with open(args.out, "w") as f:
            f.write("\n".join(["- " + h for h in header] + ["", *table_head, *map(format_row, ROWS), "", *tuned, ""]))
    print(f"\n{len(ROWS)} rows in {time.time() - start:.0f} s; written to {args.out}", flush=True)


if __name__ == "__main__":
    main()
