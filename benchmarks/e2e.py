"""End-to-end LoRA / QLoRA training steps: ftengine vs plain transformers + PEFT vs + Liger-Kernel.

Each framework runs in its own process (Liger patches classes for the whole process) over the
same random-weight models at real shapes (Llama-3.1-8B, Qwen2.5-7B), the same random tokens and
the same LoRA (r=16, alpha=16, all linear projections, PEFT's default fp32 adapters), SDPA
attention, AdamW on the adapters, and gradient checkpointing of every decoder layer:

- ``hf``: transformers + PEFT as they come (non-reentrant checkpointing, the loss from full logits);
- ``liger``: the same after ``apply_liger_kernel_to_<family>()`` (RMSNorm, RoPE, SwiGLU, fused
  linear cross-entropy);
- ``ftengine``: the model adapter's patch (``get_op``: the Triton ops on a GPU), then PEFT, then
  :func:`ftengine.engine.memory.checkpointing.apply_gradient_checkpointing` (standard; ``ftengine-offload``
  and ``ftengine-auto``: those modes; ``ftengine-offload`` also keeps the input embedding in host
  memory, ``model.offload_embedding``).

QLoRA replaces every decoder projection by a bitsandbytes NF4 ``Linear4bit`` (double-quantized,
bf16 compute), quantized on the GPU from the same random weights. Per run: tokens/s and seconds a
step (median of the timed steps), peak allocated and reserved GPU memory over the steps, MFU with
``6*N_matmul + 12*L*d*s`` FLOPs a token (N_matmul: the projection and LM-head weights; the peak is
the card's dense bf16 figure) and each step's loss.

Mixture of experts: ``qwen3-30b-a3b`` (Qwen3-30B-A3B's shapes: 128 experts, 8 a token) trains the
same LoRA on the attention and on every expert (PEFT's ``target_parameters`` on the fused expert
weights; ftengine runs them through the ``lora_moe`` grouped GEMMs). ``nf4`` quantizes the attention
with bitsandbytes on both sides; bitsandbytes cannot hold the fused 3-D expert weights, so ``hf``
keeps them bf16 (58 GB at full depth) while ftengine packs each layer's NF4 as the model is built (the
adapter's ``quantized_load``, as a ``load_in_4bit`` load packs them: the 16-bit experts are never whole on
the GPU) and unpacks them a group of experts at a time.

``ftengine-run`` / ``ftengine-run-unpacked`` (opt-in through ``--frameworks``) run ``ftengine run
config.yaml`` itself on a chat dataset the script writes, packed or one conversation a row of mixed
lengths (see ``e2e_run.py``); the checkpoint they load is written once under ``--model-cache``
(16 GB for Qwen3-8B: the 30B's 61 GB does not fit the device's disk, so run its CLI rows with ``--layers``).

GPU commands (each under 10 minutes on an H100):
``python benchmarks/e2e.py --out e2e-qwen3.jsonl --only qwen3-8b:1:none,qwen3-8b:4:none,qwen3-8b:1:nf4,qwen3-8b:4:nf4
--frameworks hf,ftengine --steps 3 --warmup 1``;
``python benchmarks/e2e.py --out e2e-moe.jsonl --only qwen3-30b-a3b:1:nf4,qwen3-30b-a3b:4:nf4 --frameworks ftengine
--steps 3 --warmup 1`` (full depth; ``hf`` at full depth needs the 58 GB of bf16 experts plus its adapters'
optimizer state: add it with ``--layers 16`` for a side-by-side);
Qwen3-30B-A3B QLoRA in the least memory (LoRA on the attention only: the per-expert adapters' fp32
weights, gradients and AdamW state alone are ~16 GB): ``python benchmarks/e2e.py --out e2e-moe-attn.jsonl
--only qwen3-30b-a3b:1:nf4 --frameworks ftengine --steps 3 --warmup 1 --targets q_proj,k_proj,v_proj,o_proj``;
``python benchmarks/e2e.py --out e2e-cli.jsonl --only qwen3-8b:1:nf4,qwen3-8b:4:nf4 --frameworks
ftengine,ftengine-run,ftengine-run-unpacked --steps 4 --warmup 2`` (``--run-attention sdpa`` trains the run's
packed rows with SDPA and a block-diagonal mask instead of its default FlexAttention).
CPU, every kind of row end to end at tiny shapes (no figures worth reporting): ``python benchmarks/e2e.py
--device cpu --out /tmp/e2e.jsonl --only qwen3-moe-tiny:1:nf4,qwen3-tiny:2:nf4 --seq 64 --steps 2 --warmup 1
--frameworks hf,ftengine,ftengine-run,ftengine-run-unpacked``.

Run on the GPU: ``python benchmarks/e2e.py --out e2e.jsonl`` (the default matrix; ``--profile``
adds one profiled step per run: GPU time by kernel kind, the top kernels, memory at the start of
the step, at the end of the forward and at its peak), then here:
``python benchmarks/e2e.py --report e2e.jsonl --results benchmarks/RESULTS.md`` writes the table
into the "## End to end" section. ``--longest llama-3.1-8b:nf4 --seq 65536`` instead searches the
longest sequence one micro-batch-1 step survives (doubling from ``--seq``, then bisection, each
trial in a fresh process); ``--memory-segments llama-3.1-8b:4:nf4`` prints where one offloaded step's
memory peaks.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import importlib.metadata
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from common import attach_lora  # noqa: E402
from common import kernel_times  # noqa: E402

MODELS = {
    "llama-3.1-8b": dict(model_type="llama", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                         num_attention_heads=32, num_key_value_heads=8, vocab_size=128256, rms_norm_eps=1e-5,
                         max_position_embeddings=131072, rope_theta=500000.0, tie_word_embeddings=False,
                         rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                       "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}),
    "qwen2.5-7b": dict(model_type="qwen2", hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                       num_attention_heads=28, num_key_value_heads=4, vocab_size=152064, rms_norm_eps=1e-6,
                       max_position_embeddings=32768, rope_theta=1000000.0, tie_word_embeddings=False),
    "qwen3-8b": dict(model_type="qwen3", hidden_size=4096, intermediate_size=12288, num_hidden_layers=36,
                     num_attention_heads=32, num_key_value_heads=8, head_dim=128, vocab_size=151936, rms_norm_eps=1e-6,
                     max_position_embeddings=40960, rope_theta=1000000.0, tie_word_embeddings=False),
    # 128 experts, 8 a token, every layer sparse; ``--layers`` keeps the per-layer shapes and cuts the depth
    "qwen3-30b-a3b": dict(model_type="qwen3_moe", hidden_size=2048, intermediate_size=6144, moe_intermediate_size=768,
                          num_hidden_layers=48, num_attention_heads=32, num_key_value_heads=4, head_dim=128,
                          num_experts=128, num_experts_per_tok=8, norm_topk_prob=True, vocab_size=151936,
                          rms_norm_eps=1e-6, max_position_embeddings=40960, rope_theta=1000000.0,
                          tie_word_embeddings=False),
    # the same architecture at a size the CPU runs in seconds (``--device cpu``: checks the script end to end)
    "qwen3-moe-tiny": dict(model_type="qwen3_moe", hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
                           num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                           num_experts=8, num_experts_per_tok=2, norm_topk_prob=True, vocab_size=640,
                           rms_norm_eps=1e-6, max_position_embeddings=2048, tie_word_embeddings=False),
    "qwen3-tiny": dict(model_type="qwen3", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, head_dim=16, vocab_size=640, rms_norm_eps=1e-6,
                       max_position_embeddings=2048, tie_word_embeddings=False),
}
LOOP_FRAMEWORKS = ("hf", "liger", "ftengine", "ftengine-offload", "ftengine-auto")
# ftengine-offload / ftengine-auto: ftengine with those gradient checkpointing modes instead of the standard one
CLI_FRAMEWORKS = ("ftengine-run", "ftengine-run-unpacked")
# ``ftengine run config.yaml`` itself (its SFT trainer) on chat rows: packed, or one row a sequence of mixed lengths
FRAMEWORKS = LOOP_FRAMEWORKS + CLI_FRAMEWORKS
# (model, micro-batch, quantization): the default matrix
MATRIX = [(model, micro_batch, quant) for model in ("llama-3.1-8b", "qwen2.5-7b") for quant in ("none", "nf4")
          for micro_batch in (1, 4)]
QWEN3_MATRIX = [("qwen3-8b", micro_batch, quant) for quant in ("none", "nf4") for micro_batch in (1, 4)] + [
    ("qwen3-30b-a3b", micro_batch, "nf4") for micro_batch in (1, 4)]
"""``--matrix qwen3``: Qwen3-8B LoRA and QLoRA, Qwen3-30B-A3B QLoRA (NF4 experts on ftengine), micro-batch 1 and 4."""
CLI_CACHE = Path(tempfile.gettempdir()) / "ftengine-e2e-models"
PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12}
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# on the MoE models PEFT maps gate_proj/up_proj/down_proj onto the fused experts (target_parameters; gate and
# up share one adapter of rank 2r), so both frameworks train the same per-expert LoRA
LORA_TARGETS = TARGETS  # ``--targets``: what the LoRA adapts (the bare-loop rows)
GIB = 1024**3
DEVICE = "cuda"


def synchronize() -> None:
    import torch

    if DEVICE == "cuda":
        torch.cuda.synchronize()


def build_model(name: str, quant: str, framework: str, layers: int | None = None):
    """A random-weight model on the GPU in bf16 (NF4 projections for ``quant == "nf4"``); ``layers`` overrides
    the depth. A mixture-of-experts model's fused experts are drawn as they are built; they stay bf16 for ``hf``;
    for ftengine with
    ``nf4`` each layer's are packed NF4 as the model is built, under the adapter's
    ``quantized_load`` as a ``load_in_4bit`` load packs them, so the 16-bit experts are never whole on the GPU."""
    import torch
    from transformers import AutoConfig
    from transformers import AutoModelForCausalLM

    from ftengine.core.kernels import get_op
    from ftengine.core.plugins import get_registry

    spec = dict(MODELS[name])
    if layers:
        spec["num_hidden_layers"] = layers
    config = AutoConfig.for_model(spec.pop("model_type"), **spec)
    if framework == "liger":
        import liger_kernel.transformers as liger

        getattr(liger, f"apply_liger_kernel_to_{config.model_type}")()
    torch.manual_seed(0)
    packing = contextlib.ExitStack()
    if getattr(config, "num_experts", 0):
        packing.enter_context(_random_experts(config.initializer_range))  # registered first: runs before the packing
        if quant == "nf4" and framework.startswith("ftengine"):
            packing.enter_context(get_registry("models")[config.model_type].quantized_load(get_op))
    with packing, torch.device(DEVICE):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16, attn_implementation="sdpa")
    model.config.use_cache = False
    if quant == "nf4":
        quantize_projections(model)
    return model


@contextlib.contextmanager
def _random_experts(std: float):
    """Draws each fused expert weight as the model's init would, the moment it is created (uninitialised), for
    every framework alike (flagged initialised, so the init after construction draws the rest identically)."""
    import torch

    def draw(module, name, param):
        if name in ("gate_up_proj", "down_proj") and param is not None and param.device.type != "meta":
            with torch.no_grad():
                param.normal_(0.0, std)
            param._is_hf_initialized = True

    handle = torch.nn.modules.module.register_module_parameter_registration_hook(draw)
    try:
        yield
    finally:
        handle.remove()


def quantize_projections(model) -> None:
    import bitsandbytes as bnb
    import torch

    for layer in model.model.layers:
        attention = getattr(layer, "self_attn", None) or layer.cross_attn  # Mllama's cross-attention layers
        for parent in (attention, layer.mlp):
            for attr in TARGETS:
                linear = getattr(parent, attr, None)
                if linear is None:
                    continue
                q = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=linear.bias is not None,
                                      compute_dtype=torch.bfloat16, quant_type="nf4", compress_statistics=True,
                                      device="meta")
                q.weight = bnb.nn.Params4bit(linear.weight.data, requires_grad=False, quant_type="nf4",
                                             compress_statistics=True).to(DEVICE)
                if linear.bias is not None:
                    q.bias = torch.nn.Parameter(linear.bias.data, requires_grad=False)
                setattr(parent, attr, q)
                del linear
    torch.cuda.empty_cache()


def matmul_params(model) -> int:
    """Weights that take part in a token's matrix products: the projections (NF4 counted unpacked), the
    experts the token is routed to and the router, and the LM head."""
    total = model.config.vocab_size * model.config.hidden_size  # the LM head
    for layer in model.model.layers:
        experts = getattr(layer.mlp, "experts", None)
        if experts is not None:
            per_expert = (experts.gate_up_proj[0].numel() + experts.down_proj[0].numel())
            total += model.config.num_experts_per_tok * per_expert + layer.mlp.gate.weight.numel()
        attention = getattr(layer, "self_attn", None) or layer.cross_attn  # Mllama's cross-attention layers
        for parent in (attention, layer.mlp):
            for attr in TARGETS:
                linear = getattr(parent, attr, None)
                if linear is not None:
                    total += linear.in_features * linear.out_features
    return total


KERNEL_KINDS = (  # (kind, substrings of CUDA kernel names), first match wins
    ("attention", ("flash", "fmha", "attention", "sdpa")),
    ("matmul", ("gemm", "nvjet", "cutlass", "xmma", "cublas", "matmul", "splitk")),
    ("copies / casts", ("copy", "cast", "memcpy", "memset", "fill")),
)


def kernel_kind(name: str) -> str:
    """A CUDA kernel's kind; Triton kernels carry their bare Python name (no ``void``, no ``::``)."""
    lowered = name.lower()
    kind = next((kind for kind, keys in KERNEL_KINDS if any(k in lowered for k in keys)), None)
    if kind:
        return kind
    if not name.startswith("void") and "::" not in name:
        return "triton (ftengine / liger ops)"
    return "other (PyTorch elementwise and reductions, bitsandbytes)"


def profile_step(model, optimizer, ids) -> dict:
    """One more step under the CUDA profiler: GPU time by kernel kind, the top kernels, and memory by phase."""
    import torch
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile

    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    start_alloc = torch.cuda.memory_allocated()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        start = time.perf_counter()
        loss = model(input_ids=ids, labels=ids).loss
        torch.cuda.synchronize()
        forward_s = time.perf_counter() - start
        forward_peak = torch.cuda.max_memory_allocated()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        wall_s = time.perf_counter() - start
    kinds: dict[str, float] = {}
    kernels: list[tuple[str, float, int]] = []
    for name, (seconds, count) in kernel_times(prof).items():
        kinds[kernel_kind(name)] = kinds.get(kernel_kind(name), 0.0) + seconds * 1e3
        kernels.append((name[:90], seconds * 1e3, count))
    kernels.sort(key=lambda k: -k[1])
    return dict(wall_ms=1e3 * wall_s, forward_ms=1e3 * forward_s, gpu_busy_ms=sum(kinds.values()),
                by_kind={k: round(v, 2) for k, v in sorted(kinds.items(), key=lambda kv: -kv[1])},
                top_kernels=[(n, round(ms, 2), c) for n, ms, c in kernels[:12]],
                start_alloc_gib=start_alloc / GIB, forward_peak_gib=forward_peak / GIB,
                step_peak_gib=torch.cuda.max_memory_allocated() / GIB)


def prepare(name: str, framework: str, quant: str, layers: int | None = None):
    """``(model, optimizer, n_matmul, patched, checkpointing)``: the model with LoRA, ready to train."""
    import torch

    model = build_model(name, quant, framework, layers)
    n_matmul = matmul_params(model)
    if quant == "nf4" and framework.startswith("ftengine"):
        model.is_loaded_in_4bit = True  # as transformers' bitsandbytes loading marks it: the patch packs the experts
    model, patched, checkpointing = attach_lora(model, framework, LORA_TARGETS)
    if framework == "ftengine-offload":
        from ftengine.engine.memory.embedding_offload import offload_input_embedding

        checkpointing += "; " + offload_input_embedding(model)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    return model, optimizer, n_matmul, patched, checkpointing


def train_step(model, optimizer, ids) -> float:
    """One step (forward, backward, AdamW); returns the loss."""
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.item()


def run(name: str, framework: str, micro_batch: int, quant: str, seq: int, steps: int, warmup: int,
        profile: bool = False, layers: int | None = None) -> dict:
    import torch

    model, optimizer, n_matmul, patched, checkpointing = prepare(name, framework, quant, layers)
    g = torch.Generator().manual_seed(1)
    batches = [torch.randint(0, model.config.vocab_size, (micro_batch, seq), generator=g).to(DEVICE)
               for _ in range(steps + warmup)]
    synchronize()
    if DEVICE == "cuda":
        torch.cuda.reset_peak_memory_stats()
    losses, times = [], []
    for ids in batches:
        start = time.perf_counter()
        loss = train_step(model, optimizer, ids)
        synchronize()
        times.append(time.perf_counter() - start)
        losses.append(round(loss, 4))
    step_s = statistics.median(times[warmup:])
    extra = {"profile": profile_step(model, optimizer, batches[-1])} if profile else {}
    tokens = micro_batch * seq
    cfg = model.config
    flops_per_token = 6 * n_matmul + 12 * cfg.num_hidden_layers * cfg.hidden_size * seq
    on_gpu = DEVICE == "cuda"
    device = torch.cuda.get_device_name() if on_gpu else "cpu"
    peak = next((v for k, v in PEAK_BF16.items() if k in device), 989e12)
    label = name if not layers else f"{name} ({layers} layers)"
    if LORA_TARGETS != TARGETS:
        label += f" (LoRA on {'/'.join(LORA_TARGETS)})"
    return dict(model=label, framework=framework, micro_batch=micro_batch, quant=quant, seq=seq,
                tokens_per_s=tokens / step_s, step_s=step_s, mfu=flops_per_token * tokens / step_s / peak,
                peak_alloc_gib=torch.cuda.max_memory_allocated() / GIB if on_gpu else 0.0,
                peak_reserved_gib=torch.cuda.max_memory_reserved() / GIB if on_gpu else 0.0, losses=losses,
                patched=patched, targets=LORA_TARGETS,
                checkpointing=checkpointing, checkpointed_layers=sum(
                    bool(getattr(m, "gradient_checkpointing", False)) for m in model.base_model.model.model.layers),
                **extra)


def run_through_cli(name: str, framework: str, micro_batch: int, quant: str, args: argparse.Namespace) -> dict:
    """A row of ``ftengine run`` itself (:mod:`e2e_run`), with the bare loop's MFU formula."""
    import torch
    from e2e_run import run_cli
    from transformers import AutoConfig
    from transformers import AutoModelForCausalLM

    spec = dict(MODELS[name])
    if args.layers:
        spec["num_hidden_layers"] = args.layers
    config = AutoConfig.for_model(spec.pop("model_type"), **spec)
    with torch.device("meta"):
        n_matmul = matmul_params(AutoModelForCausalLM.from_config(config))
    figures = run_cli(name, framework, micro_batch, quant, args.seq, args.steps, args.warmup, args.layers,
                      args.model_cache, build_model, DEVICE == "cuda", args.run_attention)
    flops_per_token = 6 * n_matmul + 12 * config.num_hidden_layers * config.hidden_size * args.seq
    device = torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu"
    peak = next((v for k, v in PEAK_BF16.items() if k in device), 989e12)
    return dict(model=name if not args.layers else f"{name} ({args.layers} layers)", framework=framework,
                micro_batch=micro_batch, quant=quant, seq=args.seq, peak_reserved_gib=None,
                mfu=flops_per_token * figures["tokens_per_s"] / peak, **figures)


def memory_segments(name: str, micro_batch: int, quant: str, seq: int, framework: str = "ftengine-offload",
                    top: int = 12) -> str:
    """Where one step's memory peaks: the peak between consecutive marks (each decoder layer's and MLP's
    forward start and end, recomputations included, and the gradient's arrival at each layer's output),
    as markdown lines, the highest first."""
    import torch

    model, optimizer, _, _, _ = prepare(name, framework, quant)
    marks: list[tuple[str, int, int]] = []

    def mark(label: str) -> None:
        marks.append((label, torch.cuda.memory_allocated(), torch.cuda.max_memory_allocated()))
        torch.cuda.reset_peak_memory_stats()

    def after_layer(index: int, output) -> None:
        mark(f"layer {index} forward end")
        hidden = output[0] if isinstance(output, tuple) else output
        if torch.is_grad_enabled() and hidden.requires_grad:
            hidden.register_hook(lambda grad: mark(f"layer {index} output gradient"))

    for index, layer in enumerate(model.base_model.model.model.layers):
        layer.register_forward_pre_hook(lambda m, a, i=index: mark(f"layer {i} forward start"))
        layer.register_forward_hook(lambda m, a, out, i=index: after_layer(i, out))
        layer.mlp.register_forward_pre_hook(lambda m, a, i=index: mark(f"layer {i} MLP start"))
        layer.mlp.register_forward_hook(lambda m, a, out, i=index: mark(f"layer {i} MLP end"))
    ids = torch.randint(0, model.config.vocab_size, (micro_batch, seq), device=DEVICE)
    for _ in range(2):  # the optimizer state exists from the first step on
        train_step(model, optimizer, ids)
    torch.cuda.synchronize()
    marks.clear()
    start = torch.cuda.memory_allocated()
    mark("step start")
    train_step(model, optimizer, ids)
    mark("step end")
    segments = sorted(((marks[k][2], marks[k - 1][0], marks[k][0]) for k in range(1, len(marks))), reverse=True)
    lines = [f"{name} {quant} mb{micro_batch} seq {seq} {framework}: {start / GIB:.2f} GiB at the step's start, "
             f"peak {segments[0][0] / GIB:.2f} GiB", "", "| peak above the start, MiB | between | and |",
             "|---|---|---|"]
    lines += [f"| {(peak - start) / 2**20:.0f} | {a} | {b} |" for peak, a, b in segments[:top]]
    return "\n".join(lines)


def worker(args: argparse.Namespace) -> None:
    """One framework, every configuration of the matrix, one JSON line each (an error line on failure)."""
    import torch

    with open(args.out, "a") as out:
        for name, micro_batch, quant in args.matrix:
            row = dict(model=name, framework=args.framework, micro_batch=micro_batch, quant=quant, seq=args.seq)
            try:
                if args.framework in CLI_FRAMEWORKS:
                    row = run_through_cli(name, args.framework, micro_batch, quant, args)
                else:
                    row = run(name, args.framework, micro_batch, quant, args.seq, args.steps, args.warmup,
                              args.profile, args.layers)
            except torch.cuda.OutOfMemoryError:
                row["error"] = "out of memory"
            except Exception as exc:  # noqa: BLE001 - one failed configuration must not stop the others
                row["error"] = f"{type(exc).__name__}: {exc}"[:300]
            out.write(json.dumps(row) + "\n")
            out.flush()
            print(json.dumps({k: v for k, v in row.items() if k not in ("patched", "profile")}), flush=True)
            if "profile" in row:
                print(format_profile(row), flush=True)
            gc.collect()
            if DEVICE == "cuda":
                torch.cuda.empty_cache()


def environment() -> str:
    import peft
    import torch
    import transformers

    versions = f"torch {torch.__version__}, transformers {transformers.__version__}, peft {peft.__version__}"
    for extra in ("liger_kernel", "bitsandbytes", "triton"):
        try:
            versions += f", {extra} {importlib.metadata.version(extra)}"
        except importlib.metadata.PackageNotFoundError:
            versions += f", {extra} absent"
    device = torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu"
    return f"{device}; {versions}; {datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC"


def report(rows: list[dict], device_line: str) -> str:
    """The markdown table: one row per configuration and framework, with the speed-up over ``hf``."""
    lines = ["## End to end", "", f"Device: {device_line}", "",
             "LoRA r=16 (alpha 16, q/k/v/o/gate/up/down, fp32 adapters as PEFT makes them), random weights at the "
             "named shapes, random tokens, seq 2048, AdamW, SDPA, every decoder layer checkpointed (standard "
             "non-reentrant; `ftengine-offload`: kept inputs in pinned host memory and the input-embedding table "
             "in host memory; `ftengine-auto`: only the layers "
             "whose activations do not fit in the card's free memory, ftengine's default). "
             "tok/s and s/step: median of the timed steps after warm-up; memory: peak over the steps; "
             "MFU: (6*N_matmul + 12*L*d*s) FLOPs a token over the dense bf16 peak. "
             "Produced by `benchmarks/e2e.py`.", "",
             "| model | quant | mb | framework | tok/s | vs hf | s/step | peak alloc GiB | vs hf | peak reserved GiB "
             "| MFU | max loss diff vs hf | loss per step |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    base = {(r["model"], r["quant"], r["micro_batch"]): r for r in rows if r["framework"] == "hf" and "error" not in r}
    order = {name: i for i, name in enumerate(MODELS)}
    rows = sorted(rows, key=lambda r: (order.get(r["model"], 99), r["quant"] != "none", r["micro_batch"],
                                       FRAMEWORKS.index(r["framework"])))
    for r in rows:
        key = (r["model"], r["quant"], r["micro_batch"])
        framework = r["framework"]
        if framework == "ftengine-auto" and "checkpointed_layers" in r:
            framework += f" ({r['checkpointed_layers']} layers checkpointed)"
        head = f"| {r['model']} | {r['quant']} | {r['micro_batch']} | {framework} "
        if "error" in r:
            lines.append(head + f"| {r['error']} | | | | | | | | |")
            continue
        hf = base.get(key)
        speedup = f"{r['tokens_per_s'] / hf['tokens_per_s']:.2f}x" if hf else ""
        memory = f"{r['peak_alloc_gib'] / hf['peak_alloc_gib']:.3f}x" if hf and hf['peak_alloc_gib'] else ""
        same_tokens = hf and framework not in CLI_FRAMEWORKS  # the CLI rows train on their own chat data
        diff = f"{max(abs(a - b) for a, b in zip(r['losses'], hf['losses'], strict=False)):.4f}" if same_tokens else ""
        losses = " ".join(f"{x:.3f}" for x in r["losses"])
        lines.append(head + f"| {r['tokens_per_s']:.0f} | {speedup} | {r['step_s']:.3f} | {r['peak_alloc_gib']:.2f} "
                     f"| {memory} | {_gib(r.get('peak_reserved_gib'))} | {100 * r['mfu']:.1f}% | {diff} | {losses} |")
    return "\n".join(lines) + "\n"


def _gib(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def format_profile(row: dict) -> str:
    """Where one step's GPU time and memory go, as markdown."""
    p = row["profile"]
    head = (f"#### {row['model']} {row['quant']} mb{row['micro_batch']} {row['framework']}: step {p['wall_ms']:.0f} ms "
            f"(forward {p['forward_ms']:.0f} ms), GPU busy {p['gpu_busy_ms']:.0f} ms; memory at step start "
            f"{p['start_alloc_gib']:.2f} GiB, peak in the forward {p['forward_peak_gib']:.2f} GiB, "
            f"peak of the step {p['step_peak_gib']:.2f} GiB")
    kinds = ["| kernel kind | GPU ms | share |", "|---|---|---|"] + [
        f"| {k} | {v:.1f} | {100 * v / p['gpu_busy_ms']:.0f}% |" for k, v in p["by_kind"].items()]
    top = ["| kernel | GPU ms | calls |", "|---|---|---|"] + [
        f"| `{n}` | {ms:.1f} | {c} |" for n, ms, c in p["top_kernels"][:8]]
    return "\n".join([head, "", *kinds, "", *top, ""])


def write_section(results: Path, section: str) -> None:
    """Replace (or append) the "## End to end" section of ``results``, leaving the other sections as they are."""
    text = results.read_text() if results.exists() else "# Benchmark results\n"
    start = text.find("## End to end")
    if start < 0:
        text = text.rstrip("\n") + "\n\n" + section
    else:
        end = text.find("\n## ", start + 1)
        text = text[:start] + section + (text[end + 1:] if end >= 0 else "")
    results.write_text(text)


def longest(args: argparse.Namespace) -> None:
    """Search the longest sequence one training step survives at micro-batch 1 (doubling, then bisection).

    Each trial is a fresh process running one step of ``args.longest`` (``model:quant``) with
    ``ftengine-offload``; the search stops at ``--resolution`` tokens or when ``--budget-s`` is spent.
    """
    name, quant = args.longest.split(":")
    good, bad, seq = 0, None, args.seq
    deadline = time.time() + args.budget_s
    while time.time() < deadline:
        before = len(args.out.read_text().splitlines())
        command = [sys.executable, __file__, "--framework", "ftengine-offload", "--out", str(args.out), "--only",
                   f"{name}:1:{quant}", "--seq", str(seq), "--steps", "1", "--warmup", "0"]
        subprocess.run(command, check=False, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        rows = [json.loads(line) for line in args.out.read_text().splitlines()[before:]]
        if rows and "error" not in rows[-1]:
            good = seq
        else:
            bad = seq
        if bad is not None and bad - good <= args.resolution:
            break
        seq = seq * 2 if bad is None else (good + bad) // 2 // 1024 * 1024
    with open(args.out, "a") as out:
        out.write(json.dumps({"longest": dict(model=name, quant=quant, trains=good, fails=bad)}) + "\n")
    print(f"longest trainable sequence, {name} {quant} mb1 ftengine-offload: {good} (fails at {bad})", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, help="JSON lines written here (GPU run)")
    parser.add_argument("--frameworks", default=",".join(LOOP_FRAMEWORKS),
                        help=f"comma-separated, of: {', '.join(FRAMEWORKS)}")
    parser.add_argument("--only", help="comma-separated model:micro_batch:quant triples instead of the default matrix")
    parser.add_argument("--matrix", choices=("default", "qwen3"), default="default",
                        help="qwen3: Qwen3-8B LoRA/QLoRA and Qwen3-30B-A3B QLoRA at micro-batch 1 and 4")
    parser.add_argument("--targets", default=",".join(TARGETS),
                        help="LoRA targets of the bare-loop rows, e.g. q_proj,k_proj,v_proj,o_proj (attention only)")
    parser.add_argument("--run-attention", choices=("auto", "sdpa", "flex_attention"), default="auto",
                        help="ftengine-run rows: model.attn_implementation (auto: the run's default)")
    parser.add_argument("--model-cache", type=Path, default=CLI_CACHE,
                        help="ftengine-run rows: where the random-weight checkpoints are written (once each)")
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--steps", type=int, default=4, help="timed steps")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--longest", help="model:quant: search the longest sequence at micro-batch 1, from --seq")
    parser.add_argument("--resolution", type=int, default=8192, help="with --longest: stop when bracketed this tightly")
    parser.add_argument("--budget-s", type=float, default=1200.0, help="with --longest: stop searching after this")
    parser.add_argument("--profile", action="store_true", help="profile one more step of each run (GPU time, memory)")
    parser.add_argument("--memory-segments", metavar="MODEL:MB:QUANT",
                        help="print where one ftengine-offload step's memory peaks (between layer and MLP hooks)")
    parser.add_argument("--layers", type=int, help="decoder layers instead of the model's own (per-layer shapes kept)")
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda",
                        help="cpu: run the script end to end at tiny shapes (no speed or memory figures)")
    parser.add_argument("--framework", help=argparse.SUPPRESS)  # the worker process
    parser.add_argument("--report", type=Path, help="JSON lines to turn into the markdown table")
    parser.add_argument("--results", type=Path, help="with --report: the RESULTS.md to write the section into")
    parser.add_argument("--note", default="", help="with --report: a paragraph added under the table")
    args = parser.parse_args()
    global DEVICE, LORA_TARGETS
    DEVICE = args.device
    LORA_TARGETS = args.targets.split(",")
    if args.only:
        args.matrix = [(m, int(b), q) for m, b, q in (t.split(":") for t in args.only.split(","))]
    else:
        args.matrix = QWEN3_MATRIX if args.matrix == "qwen3" else MATRIX
    if args.report:
        rows = [json.loads(line) for line in args.report.read_text().splitlines() if line.strip()]
        device = "; ".join(dict.fromkeys(r["device"] for r in rows if "device" in r)) or "unknown"
        section = report([r for r in rows if "framework" in r and r["seq"] == args.seq], device)
        for r in rows:
            if "longest" in r:
                lg = r["longest"]
                section += (f"\nLongest sequence one step trains at micro-batch 1 ({lg['model']}, {lg['quant']}, "
                            f"ftengine with offloaded checkpointing): {lg['trains']} tokens; {lg['fails']} fails.\n")
        if args.note:
            section += "\n" + args.note + "\n"
        profiles = [format_profile(r) for r in rows if "profile" in r]
        if profiles:
            section += "\n### Where a step goes (one profiled step, `--profile`)\n\n" + "\n".join(profiles)
        if args.results:
            write_section(args.results, section)
        print(section)
        return
    if args.memory_segments:
        name, micro_batch, quant = args.memory_segments.split(":")
        print(memory_segments(name, int(micro_batch), quant, args.seq))
        return
    if args.framework:
        worker(args)
        return
    if not args.out.exists() or not args.out.read_text().strip():
        args.out.write_text(json.dumps({"device": environment()}) + "\n")
    if args.longest:
        longest(args)
        return
    only = ",".join(f"{m}:{b}:{q}" for m, b, q in args.matrix)
    for framework in args.frameworks.split(","):
        command = [sys.executable, __file__, "--framework", framework, "--out", str(args.out), "--only", only,
                   "--seq", str(args.seq), "--steps", str(args.steps), "--warmup", str(args.warmup),
                   "--device", args.device]
        command += ["--profile"] if args.profile else []
        command += ["--layers", str(args.layers)] if args.layers else []
        command += ["--model-cache", str(args.model_cache), "--targets", args.targets,
                    "--run-attention", args.run_attention]
        subprocess.run(command, check=False, env={**os.environ, "PYTHONUNBUFFERED": "1"})


if __name__ == "__main__":
    main()
