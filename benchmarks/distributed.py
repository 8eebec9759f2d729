"""Training steps on several GPUs: DDP and FSDP2, ftengine's patched model vs plain transformers + PEFT.

Every configuration runs in its own ``torchrun`` launch (``python -m torch.distributed.run
--standalone --nproc-per-node N``), once per framework, on random-weight models at real shapes:

- ``lora-8b-ddp-{1,2,4}``: Llama-3.1-8B shape, LoRA r=16 on every projection, seq 2048, micro-batch 4
  per GPU, DDP (the adapters' gradients all-reduced);
- ``lora-8b-fsdp-{2,4}``: the same under FSDP2 (``fully_shard`` per decoder layer and the root,
  bf16 parameters, fp32 gradient reduction);
- ``full-8b-fsdp-{2,4}``: full fine-tuning of the 8B shape under FSDP2, micro-batch 1;
- ``qlora-70b-fsdp-2``: Llama-3-70B shape, NF4 base stored as bf16 (``bnb_4bit_quant_storage``) so
  FSDP2 shards it, LoRA r=16, micro-batch 1, on 2 GPUs; the row carries the memory plan
  (:func:`ftengine.engine.distributed.memory_plan`) next to the measured peak.

Frameworks: ``hf`` (transformers + PEFT as they come, transformers' own checkpointing) and
``ftengine`` (the model adapter's patch with the best kernels, then PEFT, then ftengine's
checkpointing), both with gradient checkpointing of every layer, AdamW, SDPA. Per run: global
tokens/s (every rank's tokens over the median step time), each rank's peak allocated memory, the
losses. A run that fails (out of memory, an unsupported combination) is a row with its error.

On 4 GPUs, in two commands of about 6-8 minutes each (16 launches in all):
``python benchmarks/distributed.py --out distributed.jsonl --part 1`` and the same with ``--part 2``;
then ``python benchmarks/distributed.py --report distributed.jsonl`` prints the markdown table.
On the CPU at a tiny shape, world size 1 and 2 over gloo: ``python benchmarks/distributed.py --tiny``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from e2e import MODELS  # noqa: E402
from e2e import TARGETS  # noqa: E402

SHAPES = {
    **MODELS,
    "llama-3-70b": dict(model_type="llama", hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
                        num_attention_heads=64, num_key_value_heads=8, vocab_size=128256, rms_norm_eps=1e-5,
                        max_position_embeddings=8192, rope_theta=500000.0, tie_word_embeddings=False),
    "tiny": dict(model_type="llama", hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=512, rms_norm_eps=1e-5, max_position_embeddings=256,
                 tie_word_embeddings=False),
}
# name: (shape, training, quantization, strategy, processes, micro-batch)
CONFIGS = {
    **{f"lora-8b-ddp-{n}": ("llama-3.1-8b", "lora", "none", "ddp", n, 4) for n in (1, 2, 4)},
    **{f"lora-8b-fsdp-{n}": ("llama-3.1-8b", "lora", "none", "fsdp", n, 4) for n in (2, 4)},
    **{f"full-8b-fsdp-{n}": ("llama-3.1-8b", "full", "none", "fsdp", n, 1) for n in (2, 4)},
    "qlora-70b-fsdp-2": ("llama-3-70b", "lora", "nf4", "fsdp", 2, 1),
}
# the CPU check of the script (bitsandbytes quantizes Params4bit on the move to a GPU: NF4 is GPU-only here)
PARTS = {1: ["lora-8b-ddp-1", "lora-8b-ddp-2", "lora-8b-ddp-4", "lora-8b-fsdp-2"],
         2: ["lora-8b-fsdp-4", "full-8b-fsdp-2", "full-8b-fsdp-4", "qlora-70b-fsdp-2"]}
TINY = {f"tiny-{training}-{strategy}-{n}": ("tiny", training, "none", strategy, n, 2)
        for training in ("lora", "full") for strategy in ("ddp", "fsdp") for n in (1, 2)}
FRAMEWORKS = ("hf", "ftengine")
GIB = 1024**3


def plan_for(shape: str, training: str, quant: str, processes: int) -> dict:
    """The memory plan of a configuration (bytes per GPU of weights, gradients and optimizer state)."""
    from transformers import AutoConfig

    from ftengine.engine.distributed import count_parameters
    from ftengine.engine.distributed import lora_parameters
    from ftengine.engine.distributed import memory_plan

    spec = dict(SHAPES[shape])
    config = AutoConfig.for_model(spec.pop("model_type"), **spec)
    parameters = count_parameters(config)
    trainable = parameters if training == "full" else lora_parameters(config, 16)
    plan = memory_plan(parameters, trainable, 2, processes, load_in_4bit=quant == "nf4",
                       full_finetuning=training == "full")
    return {"parameters": parameters, "trainable": trainable, "ddp_gib": plan.replicated_bytes / GIB,
            "fsdp_gib": plan.sharded_bytes / GIB}


def quantize_layer(layer, device, dtype) -> None:
    """Every projection of one decoder layer to a bitsandbytes NF4 ``Linear4bit`` whose packed
    weight is stored as ``dtype`` (so FSDP2 shards it like the other weights)."""
    import bitsandbytes as bnb

    for parent in (layer.self_attn, layer.mlp):
        for attr in TARGETS:
            linear = getattr(parent, attr, None)
            if linear is None:
                continue
            q = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=False, compute_dtype=dtype,
                                  quant_type="nf4", compress_statistics=True, quant_storage=dtype, device="meta")
            q.weight = bnb.nn.Params4bit(linear.weight.data, requires_grad=False, quant_type="nf4",
                                         compress_statistics=True, quant_storage=dtype).to(device)
            setattr(parent, attr, q)


def build(shape: str, quant: str, device, dtype):
    """A random-weight model, built on the meta device and materialized one decoder layer at a time
    (quantized at once for NF4), so a 70B shape never exists in 16 bits on one GPU."""
    import torch
    from transformers import AutoConfig
    from transformers import AutoModelForCausalLM

    spec = dict(SHAPES[shape])
    config = AutoConfig.for_model(spec.pop("model_type"), **spec)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    generator = torch.Generator(device=device).manual_seed(0)

    def materialize(module) -> None:
        module.to_empty(device=device, recurse=True)
        for name, tensor in [*module.named_parameters(recurse=True), *module.named_buffers(recurse=True)]:
            if "inv_freq" in name:
                continue
            if name.endswith("norm.weight") or name == "weight" and tensor.dim() == 1:
                tensor.data.fill_(1.0)
            else:
                tensor.data.normal_(0.0, 0.02, generator=generator)

    for name, child in model.model.named_children():
        if name != "layers":
            materialize(child)
    with torch.device(device):  # the rotary tables computed, not random
        model.model.rotary_emb = type(model.model.rotary_emb)(config=config)
    for layer in model.model.layers:
        materialize(layer)
        if quant == "nf4":
            quantize_layer(layer, device, dtype)
    materialize(model.lm_head)
    return model


def prepare(framework: str, shape: str, training: str, quant: str, strategy: str, device, dtype):
    import torch
    from peft import LoraConfig
    from peft import get_peft_model

    model = build(shape, quant, device, dtype)
    if framework == "ftengine":
        from ftengine.core.kernels import get_op
        from ftengine.core.plugins import adapter_for_model_type

        adapter_for_model_type(model.config.model_type).patch(model, get_op)
    if training == "lora":
        model = get_peft_model(model, LoraConfig(r=16, lora_alpha=16, target_modules=TARGETS, task_type="CAUSAL_LM"))
    if framework == "ftengine":
        from ftengine.engine.memory.checkpointing import apply_gradient_checkpointing

        apply_gradient_checkpointing(model, True)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if training == "lora":
            model.enable_input_require_grads()
    model.train()
    if strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        model = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    else:
        from torch.distributed.fsdp import MixedPrecisionPolicy
        from torch.distributed.fsdp import fully_shard

        from ftengine.engine.memory.checkpointing import decoder_layers

        policy = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32)
        for layer in decoder_layers(model):
            fully_shard(layer, mp_policy=policy)
        fully_shard(model, mp_policy=policy)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    return model, optimizer


def worker(args: argparse.Namespace) -> None:
    """One configuration on this torchrun job's ranks; rank 0 appends the row to ``--out``."""
    import torch
    import torch.distributed as dist

    shape, training, quant, strategy, processes, micro_batch = (CONFIGS | TINY)[args.config]
    on_gpu = torch.cuda.is_available() and not args.tiny
    rank, local_rank = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"])
    if on_gpu:
        torch.cuda.set_device(local_rank)
    dist.init_process_group("nccl" if on_gpu else "gloo")
    device = torch.device("cuda", local_rank) if on_gpu else torch.device("cpu")
    dtype = torch.bfloat16 if on_gpu else torch.float32
    row = dict(config=args.config, framework=args.framework, shape=shape, training=training, quant=quant,
               strategy=strategy, processes=processes, micro_batch=micro_batch, seq=args.seq,
               plan=plan_for(shape, training, quant, processes))
    try:
        model, optimizer = prepare(args.framework, shape, training, quant, strategy, device, dtype)
        vocab = SHAPES[shape]["vocab_size"]
        g = torch.Generator().manual_seed(1 + rank)
        batches = [torch.randint(0, vocab, (micro_batch, args.seq), generator=g).to(device)
                   for _ in range(args.steps + args.warmup)]
        if on_gpu:
            torch.cuda.reset_peak_memory_stats()
        times, losses = [], []
        for ids in batches:
            start = time.perf_counter()
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(round(loss.item(), 4))
            if on_gpu:
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
        step_s = statistics.median(times[args.warmup:])
        peak = torch.cuda.max_memory_allocated() / GIB if on_gpu else 0.0
        row.update(status="ok", step_s=step_s, tokens_per_s=processes * micro_batch * args.seq / step_s,
                   losses=losses)
    except Exception as exc:  # a failed configuration is a result too (out of memory, unsupported)
        peak = torch.cuda.max_memory_allocated() / GIB if on_gpu else 0.0
        row.update(status=f"failed: {type(exc).__name__}: {str(exc).splitlines()[0][:300]}")
    peaks = [None] * dist.get_world_size()
    dist.all_gather_object(peaks, round(peak, 2))
    if rank == 0:
        row.update(peak_alloc_gib=peaks, device=environment(on_gpu))
        with open(args.out, "a") as handle:
            handle.write(json.dumps(row) + "\n")
    dist.destroy_process_group()


def environment(on_gpu: bool) -> str:
    import peft
    import torch
    import transformers

    device = torch.cuda.get_device_name() if on_gpu else "CPU"
    count = torch.cuda.device_count() if on_gpu else os.cpu_count()
    return (f"{count}x {device}; torch {torch.__version__}, transformers {transformers.__version__}, "
            f"peft {peft.__version__}; {datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC")


def launch(config: str, framework: str, args: argparse.Namespace) -> int:
    processes = (CONFIGS | TINY)[config][4]
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={processes}",
               __file__, "--worker", "--config", config, "--framework", framework, "--out", str(args.out),
               "--seq", str(args.seq), "--steps", str(args.steps), "--warmup", str(args.warmup),
               *(["--tiny"] if args.tiny else [])]
    start = time.perf_counter()
    code = subprocess.run(command, env=dict(os.environ, OMP_NUM_THREADS="1")).returncode
    print(f"{config} {framework}: exit {code} in {time.perf_counter() - start:.0f} s", file=sys.stderr)
    return code


def report(rows: list[dict]) -> str:
    lines = ["| configuration | framework | GPUs | tokens/s (global) | step s | peak GiB per rank | plan GiB per rank "
             "(weights+grads+optimizer) |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        plan = r["plan"]["fsdp_gib" if r["strategy"] == "fsdp" else "ddp_gib"]
        peaks = "/".join(f"{p:.1f}" for p in r["peak_alloc_gib"])
        if r["status"] == "ok":
            lines.append(f"| {r['config']} | {r['framework']} | {r['processes']} | {r['tokens_per_s']:,.0f} | "
                         f"{r['step_s']:.3f} | {peaks} | {plan:.1f} |")
        else:
            lines.append(f"| {r['config']} | {r['framework']} | {r['processes']} | {r['status']} | | {peaks} | "
                         f"{plan:.1f} |")
    devices = sorted({r["device"].split(";")[0] + ";" + r["device"].split(";")[1] for r in rows})
    return "\n".join(lines) + "\n\n" + "\n".join(f"Device: {d}" for d in devices)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("distributed.jsonl"), help="JSON lines appended here")
    parser.add_argument("--only", help="comma-separated configuration names (default: all)")
    parser.add_argument("--part", type=int, choices=sorted(PARTS), help="half of the GPU list (each under 10 min)")
    parser.add_argument("--frameworks", default=",".join(FRAMEWORKS))
    parser.add_argument("--tiny", action="store_true", help="tiny shape on CPU processes over gloo")
    parser.add_argument("--seq", type=int, default=None, help="sequence length (default 2048; 64 with --tiny)")
    parser.add_argument("--steps", type=int, default=4, help="timed steps")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--report", type=Path, help="print the markdown table of these JSON lines")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--config", help=argparse.SUPPRESS)
    parser.add_argument("--framework", help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.seq = args.seq or (64 if args.tiny else 2048)
    if args.report:
        print(report([json.loads(line) for line in args.report.read_text().splitlines() if line.strip()]))
        return
    if args.worker:
        worker(args)
        return
    names = args.only.split(",") if args.only else PARTS[args.part] if args.part else list(TINY if args.tiny
                                                                                            else CONFIGS)
    failed = sum(launch(name, framework, args) != 0 for name in names for framework in args.frameworks.split(","))
    print(report([json.loads(line) for line in args.out.read_text().splitlines() if line.strip()]))
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
