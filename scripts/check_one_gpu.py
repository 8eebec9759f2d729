"""One-GPU check of multi-process training: ``torchrun --nproc-per-node 1`` runs ``ftengine run``'s pipeline
with ``distributed.strategy`` ddp, fsdp, and fsdp over a 4-bit (QLoRA) base.

For each, on a random-weight Qwen2-architecture model of GPU size (hidden 1024, 8 layers; the demo's
tokenizer and chat data), the launched process records every kernel op the patched model calls and which
backend served it, and how every LoRA projection was routed (fused, or peft's own path). The check
fails unless: the run's strategy is the configured one (FSDP2 really sharded the model under fsdp),
every patched op ran on the Triton backend (on the CPU: the backend ``op_table`` names), every projection
went through the fused LoRA ops (with the NF4 base under QLoRA), and the loss fell (the mean of the
last five logged losses at least half a nat below the first five's).

On the GPU machine, about 2-3 minutes in all:
``python scripts/check_one_gpu.py --out one_gpu.jsonl``
On the CPU (ddp only: accelerate applies FSDP to GPU processes; a tiny model, gloo):
``python scripts/check_one_gpu.py --device cpu --out one_gpu_cpu.jsonl``
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import subprocess
import sys
import time
from pathlib import Path

FUSED_OPS = ("rms_norm", "rope", "lora_qkv", "lora_linear", "lora_mlp", "linear_cross_entropy")
"""The ops a patched Qwen2 LoRA step calls (attention q/k/v, o, the MLP with its SwiGLU, the norms, rope,
the loss; under QLoRA the fused LoRA ops dequantize the NF4 base themselves)."""
SHAPES = {
    "gpu": dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=8, num_attention_heads=16,
                num_key_value_heads=4),
    "cpu": dict(hidden_size=128, intermediate_size=384, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2),
}
CHECKS = {"ddp": ("ddp", False), "fsdp": ("fsdp", False), "qlora-fsdp": ("fsdp", True)}
STEPS = 30


def build_model(target: Path, device: str) -> Path:
    """A random-weight Qwen2 of the ``device`` shape, saved with the demo's tokenizer (vocabulary 640)."""
    import torch
    from transformers import AutoConfig
    from transformers import AutoModelForCausalLM
    from transformers import AutoTokenizer

    from ftengine.demo import ASSETS

    if (target / "config.json").exists():
        return target
    spec = {**json.loads((ASSETS / "model_config.json").read_text()), **SHAPES[device], "initializer_range": 0.02}
    config = AutoConfig.for_model(**spec)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.save_pretrained(str(target))
    AutoTokenizer.from_pretrained(str(ASSETS / "tokenizer")).save_pretrained(str(target))
    return target


def run_config(base: Path, check: str, device: str, out: Path) -> dict:
    from ftengine.demo import ASSETS

    strategy, qlora = CHECKS[check]
    dtype = "bfloat16" if device == "gpu" else "float32"
    return {
        "model": {"name_or_path": str(base), "max_seq_length": 128, "dtype": dtype},
        **({"quantization": {"load_in_4bit": True, "bnb_4bit_compute_dtype": dtype}} if qlora else {}),
        "lora": {"r": 16, "lora_alpha": 32, "lora_dropout": 0.0},
        "data": {"path": str(ASSETS / "data.jsonl"), "format": "messages", "chat_template": "chatml"},
        "training": {"max_steps": STEPS, "per_device_train_batch_size": 8, "gradient_accumulation_steps": 1,
                     "learning_rate": 2e-3, "lr_scheduler_type": "constant", "warmup_steps": 0, "logging_steps": 1,
                     "save_steps": STEPS, "gradient_checkpointing": True, "seed": 3407},
        "export": [],
        "output": {"dir": str(out / "runs"), "name": check},
        "distributed": {"strategy": strategy},
    }


# ----------------------------------------------------------------------------- in the launched process


def record_ops(calls: collections.Counter) -> None:
    """Count every op the patched model resolves, by ``(backend, op)``."""
    from ftengine.core import kernels

    resolve = kernels.resolve_op

    def recording(name, backends):
        backend, fn = resolve(name, backends)

        def call(*args, **kwargs):
            calls[f"{backend}:{name}"] += 1
            return fn(*args, **kwargs)

        return backend, call

    kernels.resolve_op = recording


def record_routes(routes: collections.Counter) -> None:
    """Count how each LoRA projection ran: a fused kind (``lora``, ``lora+nf4``) or peft's path (the reason)."""
    from ftengine.plugins.models import _patching

    route = _patching.route

    def recording(module):
        weights, kind = route(module)
        routes[kind] += 1
        return weights, kind

    _patching.route = recording


def worker(config_path: Path, result_path: Path) -> None:
    from ftengine.core.config import load_config
    from ftengine.core.kernels import op_table
    from ftengine.engine import distributed
    from ftengine.engine import pipeline

    calls: collections.Counter = collections.Counter()
    routes: collections.Counter = collections.Counter()
    record_ops(calls)
    record_routes(routes)
    start = time.perf_counter()
    try:
        result = pipeline.run(load_config(config_path))
        sharded = distributed.is_sharded(result.model)
    finally:
        distributed.shutdown()
    if distributed.is_main_process():
        result_path.write_text(json.dumps({
            "notes": result.notes, "losses": [loss for _, loss in result.train.losses], "sharded": sharded,
            "ops": dict(calls), "routes": dict(routes), "op_table": op_table(),
            "seconds": round(time.perf_counter() - start, 1)}))


# ----------------------------------------------------------------------------- the checks


def problems(check: str, row: dict, device: str) -> list[str]:
    strategy, qlora = CHECKS[check]
    found = []
    if not any(n.startswith(f"distributed: {strategy} over 1 processes") for n in row["notes"]):
        found.append(f"strategy {strategy} not used: {[n for n in row['notes'] if n.startswith('distributed')]}")
    if row["sharded"] != (strategy == "fsdp"):
        found.append(f"FSDP2 sharded the model: {row['sharded']}, expected {strategy == 'fsdp'}")
    want = "triton" if device == "gpu" else None
    for op in FUSED_OPS:
        backend = want or row["op_table"][op]
        if not row["ops"].get(f"{backend}:{op}"):
            found.append(f"{op} never ran on {backend}")
    others = sorted(k for k in row["ops"] if not k.startswith(f"{want}:")) if want else []
    if others:
        found.append(f"ops on another backend: {others}")
    fused = "lora+nf4" if qlora else "lora"
    if set(row["routes"]) != {fused}:
        found.append(f"projections routed {row['routes']}, expected all {fused}")
    losses = row["losses"]
    if len(losses) < 10 or (sum(losses[:5]) - sum(losses[-5:])) / 5 < 0.5:
        found.append(f"the loss did not fall: {losses}")
    return found


def launch(check: str, device: str, base: Path, out: Path) -> dict:
    import yaml

    folder = out / check
    folder.mkdir(parents=True, exist_ok=True)
    config = folder / "config.yaml"
    config.write_text(yaml.safe_dump(run_config(base, check, device, folder)))
    result = folder / "result.json"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join(
        filter(None, [str(Path(__file__).parents[1]), os.environ.get("PYTHONPATH")])))
    if device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=1", __file__,
               "--worker", str(config), str(result)]
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    if done.returncode != 0 or not result.exists():
        return {"check": check, "status": f"failed: exit {done.returncode}: {done.stderr.strip()[-2000:]}"}
    row = {"check": check, **json.loads(result.read_text())}
    found = problems(check, row, device)
    row["status"] = "ok" if not found else "failed: " + "; ".join(found)
    return row


def environment(device: str) -> str:
    import torch

    name = torch.cuda.get_device_name() if device == "gpu" else "CPU"
    return f"{name}; torch {torch.__version__}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=("gpu", "cpu"), default="gpu")
    parser.add_argument("--out", type=Path, default=Path("one_gpu.jsonl"), help="JSON lines written here")
    parser.add_argument("--work", type=Path, default=None, help="model and run directories (default: beside --out)")
    parser.add_argument("--only", help="comma-separated checks: " + ", ".join(CHECKS))
    parser.add_argument("--worker", nargs=2, type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(*args.worker)
        return
    checks = args.only.split(",") if args.only else list(CHECKS) if args.device == "gpu" else ["ddp"]
    work = args.work or args.out.with_suffix("")
    base = build_model(work / "model", args.device)
    rows = []
    for check in checks:
        row = launch(check, args.device, base, work)
        row["device"] = environment(args.device)
        rows.append(row)
        losses = row.get("losses") or []
        print(f"{check:11s} {row.get('seconds', 0):6.1f} s  loss {losses[0] if losses else float('nan'):.3f} -> "
              f"{losses[-1] if losses else float('nan'):.3f}  {row['status']}", flush=True)
    args.out.write_text("".join(json.dumps(r) + "\n" for r in rows))
    print(f"device: {rows[0]['device']}")
    sys.exit(0 if all(r["status"] == "ok" for r in rows) else 1)


if __name__ == "__main__":
    main()
