"""Time GGUF quantization of an 8B-shaped model (Llama 3 8B tensor shapes, random bf16 weights).

No checkpoint is needed: one random tensor per distinct shape is made once and quantized for every
tensor of that shape, with the same per-tensor type choice as a real export (``q4_k_m`` puts
attn_v / ffn_down of some layers and the output at Q6_K, ...). Only quantization is timed; the
source tensors start on the CPU, as the merged weights of a real export do.

Run (on the GPU machine, or anywhere for a smaller check)::

    python benchmarks/export.py                          # q8_0 and q4_k_m, 32 layers
    python benchmarks/export.py --types q8_0,q4_k_m,q6_k --layers 4 --json results.jsonl
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import torch

from ftengine.plugins.exporters.gguf import mixes
from ftengine.plugins.exporters.gguf.quants import quantize
from ftengine.plugins.exporters.gguf.quants.common import compute_device

LLAMA3_8B = dict(hidden=4096, intermediate=14336, layers=32, heads=32, kv_heads=8, vocab=128256)


def tensor_shapes(hidden: int, intermediate: int, layers: int, heads: int, kv_heads: int, vocab: int):
    """``(gguf_name, torch_shape)`` of every matrix of a Llama-style model (norms left out: they stay F32)."""
    kv = hidden // heads * kv_heads
    yield "token_embd.weight", (vocab, hidden)
    for i in range(layers):
        yield f"blk.{i}.attn_q.weight", (hidden, hidden)
        yield f"blk.{i}.attn_k.weight", (kv, hidden)
        yield f"blk.{i}.attn_v.weight", (kv, hidden)
        yield f"blk.{i}.attn_output.weight", (hidden, hidden)
        yield f"blk.{i}.ffn_gate.weight", (intermediate, hidden)
        yield f"blk.{i}.ffn_up.weight", (intermediate, hidden)
        yield f"blk.{i}.ffn_down.weight", (hidden, intermediate)
    yield "output.weight", (vocab, hidden)


def run(quantization: str, shapes: list, layers: int) -> dict:
    """Quantize every tensor once; return the row of the results table."""
    sources: dict[tuple[int, ...], torch.Tensor] = {}
    seconds = 0.0
    weights = out_bytes = 0
    for name, shape in shapes:
        if shape not in sources:
            sources[shape] = (torch.randn(shape) * 0.02).to(torch.bfloat16)
        qtype = mixes.tensor_type(name, shape, quantization, layers, tied_embeddings=False)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        start = time.perf_counter()
        data = quantize(sources[shape], qtype)
        seconds += time.perf_counter() - start
        weights += sources[shape].numel()
        out_bytes += data.nbytes
    return {"quantization": quantization, "tensors": len(shapes), "weights": weights, "seconds": seconds,
            "mweights_per_s": weights / seconds / 1e6, "gib_out": out_bytes / 2**30}


def device_line() -> str:
    """The machine the numbers were taken on."""
    device = compute_device()
    if device.type == "cuda":
        name = torch.cuda.get_device_name()
    else:
        name = f"CPU {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"
    return f"{name} | torch {torch.__version__} | {time.strftime('%Y-%m-%d %H:%M')}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--types", default="q8_0,q4_k_m", help="comma-separated quantizations")
    parser.add_argument("--layers", type=int, default=LLAMA3_8B["layers"], help="blocks (32 = the full 8B)")
    parser.add_argument("--repeats", type=int, default=1, help="full passes per type; the median is reported")
    parser.add_argument("--json", help="append one JSON line per type to this file")
    args = parser.parse_args()

    config = {**LLAMA3_8B, "layers": args.layers}
    shapes = list(tensor_shapes(**config))
    print(device_line())
    print(f"{'type':8} {'tensors':>7} {'weights':>14} {'seconds':>9} {'M weights/s':>12} {'GiB out':>8}")
    for quantization in args.types.split(","):
        rows = [run(mixes.check_quantization(quantization), shapes, args.layers) for _ in range(args.repeats)]
        row = dict(rows[0], seconds=statistics.median(r["seconds"] for r in rows))
        row["mweights_per_s"] = row["weights"] / row["seconds"] / 1e6
        print(f"{row['quantization']:8} {row['tensors']:>7} {row['weights']:>14,} {row['seconds']:>9.1f} "
              f"{row['mweights_per_s']:>12.1f} {row['gib_out']:>8.2f}")
        if args.json:
            with open(args.json, "a", encoding="utf-8") as handle:
                handle.write(json.dumps({**row, "device": device_line(), "layers": args.layers}) + "\n")


if __name__ == "__main__":
    main()
