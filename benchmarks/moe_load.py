"""GPU memory while a mixture-of-experts checkpoint loads in 4 bits: ftengine's loader against plain transformers.

A random-weight checkpoint with Qwen3-30B-A3B's shapes (128 experts of width 768, hidden 2048) and
``--layers`` decoder layers (the full 48 are 61 GB on disk) is written once under ``--dir``; each side then
loads it in a fresh process with bitsandbytes' NF4 config (double quantization, bf16 compute) onto the GPU:

- ``hf``: ``AutoModelForCausalLM.from_pretrained(..., quantization_config=...)``: bitsandbytes quantizes the
  attention's ``nn.Linear`` layers and leaves the fused 3-D experts bf16;
- ``ftengine``: :func:`ftengine.engine.pipeline.load` with ``quantization.load_in_4bit`` (what ``ftengine run``
  and the Python API call), which packs each layer's experts NF4 as the loader assigns them.

Per side: seconds to load, peak allocated GPU memory during the load, memory allocated once loaded, and
the bf16 size of the experts for scale.

GPU: ``python benchmarks/moe_load.py --dir /tmp/moe-ckpt --layers 8``; CPU smoke run (no memory figures):
``python benchmarks/moe_load.py --dir /tmp/moe-tiny --model qwen3-moe-tiny --layers 2``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))

import e2e  # noqa: E402  (the model shapes and the environment line)

REPO = Path(__file__).resolve().parent.parent
GIB = 2**30


def write_checkpoint(directory: Path, name: str, layers: int) -> None:
    """The random checkpoint and the demo tokenizer, unless ``directory`` holds them already."""
    import shutil

    from transformers import AutoConfig
    from transformers import AutoModelForCausalLM

    if (directory / "config.json").exists():
        return
    spec = dict(e2e.MODELS[name], num_hidden_layers=layers)
    config = AutoConfig.for_model(spec.pop("model_type"), **spec)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(str(directory))
    for file in (REPO / "ftengine" / "demo" / "tokenizer").iterdir():
        shutil.copy(file, directory / file.name)


def load(framework: str, directory: Path) -> dict:
    """Load once on the GPU; the row of figures."""
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    if framework == "hf":
        from transformers import AutoModelForCausalLM
        from transformers import BitsAndBytesConfig

        bnb = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                 bnb_4bit_compute_dtype=torch.bfloat16)
        model = AutoModelForCausalLM.from_pretrained(str(directory), quantization_config=bnb, dtype=torch.bfloat16,
                                                     device_map={"": 0} if cuda else None)
    else:
        from ftengine.core.config import validate_config
        from ftengine.engine import pipeline

        config = validate_config({
            "model": {"name_or_path": str(directory), "dtype": "bfloat16"},
            "quantization": {"load_in_4bit": True},
            "data": {"path": str(REPO / "ftengine" / "demo" / "data.jsonl")},
        })
        model = pipeline.load(config).model
    if cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    experts = sum(p.numel() for n, p in model.named_parameters() if ".experts." in n)
    return {"framework": framework, "load_s": round(seconds, 1),
            "peak_alloc_gib": round(torch.cuda.max_memory_allocated() / GIB, 2) if cuda else None,
            "alloc_after_gib": round(torch.cuda.memory_allocated() / GIB, 2) if cuda else None,
            "experts_bf16_gib": round(experts * 2 / GIB, 2), "device": e2e.environment() if cuda else "cpu"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dir", type=Path, required=True, help="where the checkpoint is (or is written)")
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--model", default="qwen3-30b-a3b", choices=("qwen3-30b-a3b", "qwen3-moe-tiny"),
                        help="qwen3-moe-tiny: a CPU smoke run")
    parser.add_argument("--frameworks", default="hf,ftengine")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # a child process: load with this framework
    parser.add_argument("--out", type=Path, help="append one JSON row per framework")
    args = parser.parse_args()
    if args.one:
        print(json.dumps(load(args.one, args.dir)))
        return
    write_checkpoint(args.dir, args.model, args.layers)
    for framework in args.frameworks.split(","):
        child = subprocess.run([sys.executable, __file__, "--dir", str(args.dir), "--one", framework],
                               capture_output=True, text=True, check=False)
        if child.returncode:
            raise SystemExit(f"{framework}: the load failed:\n{child.stderr[-3000:]}")
        row = {**json.loads(child.stdout.strip().splitlines()[-1]), "layers": args.layers}
        print(json.dumps(row), flush=True)
        if args.out:
            with args.out.open("a", encoding="utf-8") as f:
                f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
