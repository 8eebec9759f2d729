"""Time GGUF exports of an 8B-shaped model (Llama 3 8B tensor shapes, random bf16 weights).

Two modes. The default times quantization only: one random tensor per distinct shape is made once
and quantized for every tensor of that shape, with the same per-tensor type choice as a real export
(``q4_k_m`` puts attn_v / ffn_down of some layers and the output at Q6_K, ...); the source tensors
start on the CPU, as the merged weights of a real export do.

``--files`` runs the real export path instead: a whole ``LlamaForCausalLM`` of that shape is built
in bf16 (random weights, the demo tokenizer padded to the vocabulary as llama.cpp's converter pads
it) and ``write_gguf`` writes one complete file per type, one type after the other in this one
process (each file is deleted once measured, so the disk holds one at a time). Per type: wall time,
file size and the peak host memory (resident set, sampled every 20 ms) over the model's own.
``--files --together`` writes every type in one ``write_ggufs`` call instead, as an export entry with a
list of quantizations does (one merge of the weights, each tensor quantized to every type as it
passes): one row with the total time, the files' sizes and the peak host memory, also as a multiple of
the model's 16-bit size.

Run (on the GPU machine, or anywhere for a smaller check)::

    python benchmarks/export.py                          # q8_0 and q4_k_m, 32 layers, quantization only
    python benchmarks/export.py --files --json export.jsonl                    # every type, whole files
    python benchmarks/export.py --files --tiny           # every type, a 2-layer model: a CPU smoke check
    python benchmarks/export.py --files --together --json export.jsonl         # every type in one run
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import threading
import time
from pathlib import Path

import psutil
import torch

from ftengine.plugins.exporters.gguf import mixes
from ftengine.plugins.exporters.gguf.quants import quantize
from ftengine.plugins.exporters.gguf.quants.common import compute_device

LLAMA3_8B = dict(hidden=4096, intermediate=14336, layers=32, heads=32, kv_heads=8, vocab=128256)
TINY = dict(hidden=256, intermediate=512, layers=2, heads=4, kv_heads=1, vocab=640)
ALL_TYPES = ["q8_0", "q6_k", "q5_k_m", "q5_k_s", "q5_1", "q5_0", "q4_k_m", "q4_k_s", "q4_1", "q4_0", "iq4_nl",
             "iq4_xs", "q3_k_l", "q3_k_m", "q3_k_s", "q2_k"]
REPO = Path(__file__).resolve().parent.parent


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


class PeakMemory:
    """The largest resident set of this process while in the ``with`` block, sampled every ``period`` s."""

    def __init__(self, period: float = 0.02) -> None:
        self.period, self.peak, self._process = period, 0, psutil.Process()
        self._stop = threading.Event()

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._process.memory_info().rss)
            self._stop.wait(self.period)

    def __enter__(self) -> PeakMemory:
        self.peak = self._process.memory_info().rss
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._process.memory_info().rss)


def random_model(hidden: int, intermediate: int, layers: int, heads: int, kv_heads: int, vocab: int):
    """A bf16 ``LlamaForCausalLM`` of the given shape with N(0, 0.02) weights (norms at 1), built without
    a float32 copy: parameters are allocated empty and filled in place."""
    from transformers import LlamaConfig
    from transformers import LlamaForCausalLM

    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate,
                         num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                         max_position_embeddings=8192, rms_norm_eps=1e-5, tie_word_embeddings=False)
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device("meta"):
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(default)
    model = model.to_empty(device="cpu")
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.fill_(1.0)
            else:
                param.copy_(torch.randn(param.shape, generator=generator, dtype=torch.float32) * 0.02)
    return model.eval()


def built_model(shape: dict) -> tuple:
    """``(tokenizer, model, weights, build seconds, resident bytes after)``: the demo tokenizer and the model."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(REPO / "ftengine" / "demo" / "tokenizer"))
    started = time.perf_counter()
    model = random_model(**shape)
    build = time.perf_counter() - started
    weights = sum(p.numel() for p in model.parameters())
    base_rss = psutil.Process().memory_info().rss
    print(f"model: {weights / 1e9:.2f} B weights built in {build:.1f} s, resident {base_rss / 2**30:.2f} GiB")
    return tokenizer, model, weights, build, base_rss


def write_files(types: list[str], shape: dict, directory: Path, json_path: str | None) -> list[dict]:
    """Build the model once, then write one whole GGUF file per type; one row per type."""
    from ftengine.plugins.exporters.gguf.writer import write_gguf

    started = time.perf_counter()
    tokenizer, model, weights, build, base_rss = built_model(shape)
    print(f"{'type':8} {'seconds':>8} {'GiB file':>9} {'peak GiB':>9} {'over model GiB':>15}")
    rows = []
    for quantization in types:
        path = directory / f"model-{quantization}.gguf"
        with PeakMemory() as memory:
            start = time.perf_counter()
            write_gguf(model, tokenizer, path, quantization)
            seconds = time.perf_counter() - start
        size = path.stat().st_size
        path.unlink()
        row = {"quantization": quantization, "weights": weights, "seconds": seconds, "gib_file": size / 2**30,
               "peak_rss_gib": memory.peak / 2**30, "over_model_gib": (memory.peak - base_rss) / 2**30}
        rows.append(row)
        print(f"{quantization:8} {seconds:>8.1f} {row['gib_file']:>9.2f} {row['peak_rss_gib']:>9.2f} "
              f"{row['over_model_gib']:>15.2f}", flush=True)
        if json_path:
            with open(json_path, "a", encoding="utf-8") as handle:
                handle.write(json.dumps({**row, "mode": "files", "device": device_line(), "layers": shape["layers"],
                                         "model_build_seconds": build}) + "\n")
    total = time.perf_counter() - started
    print(f"total wall time {total:.1f} s (model build included); peak resident "
          f"{max(r['peak_rss_gib'] for r in rows):.2f} GiB")
    return rows


def write_together(types: list[str], shape: dict, directory: Path, json_path: str | None) -> dict:
    """Build the model once, then write every type's file in one ``write_ggufs`` call; one row."""
    from ftengine.plugins.exporters.gguf.writer import write_ggufs

    tokenizer, model, weights, build, base_rss = built_model(shape)
    targets = {q: directory / f"model-{q}.gguf" for q in types}
    with PeakMemory() as memory:
        start = time.perf_counter()
        write_ggufs(model, tokenizer, targets)
        seconds = time.perf_counter() - start
    sizes = {q: p.stat().st_size / 2**30 for q, p in targets.items()}
    f16_gib = weights * 2 / 2**30
    row = {"quantizations": types, "weights": weights, "seconds": seconds, "gib_files": sizes,
           "peak_rss_gib": memory.peak / 2**30, "over_model_gib": (memory.peak - base_rss) / 2**30,
           "peak_over_f16": memory.peak / 2**30 / f16_gib}
    print(f"{len(types)} types in one run: {seconds:.1f} s, {sum(sizes.values()):.2f} GiB of files; peak resident "
          f"{row['peak_rss_gib']:.2f} GiB ({row['over_model_gib']:.2f} over the model), {row['peak_over_f16']:.2f}x "
          f"the 16-bit size ({f16_gib:.2f} GiB)")
    if json_path:
        with open(json_path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps({**row, "mode": "together", "device": device_line(), "layers": shape["layers"],
                                     "model_build_seconds": build}) + "\n")
    return row


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
    parser.add_argument("--types", help="comma-separated quantizations (default: q8_0,q4_k_m; with --files, all)")
    parser.add_argument("--layers", type=int, default=LLAMA3_8B["layers"], help="blocks (32 = the full 8B)")
    parser.add_argument("--repeats", type=int, default=1, help="full passes per type; the median is reported")
    parser.add_argument("--files", action="store_true", help="write whole GGUF files through write_gguf")
    parser.add_argument("--together", action="store_true", help="--files: every type in one write_ggufs call")
    parser.add_argument("--tiny", action="store_true", help="a 2-layer, hidden-256 model (a CPU smoke check)")
    parser.add_argument("--out", help="--files: directory for the files (default: a temporary one)")
    parser.add_argument("--json", help="append one JSON line per type to this file")
    args = parser.parse_args()

    config = dict(TINY) if args.tiny else {**LLAMA3_8B, "layers": args.layers}
    if args.files:
        types = [mixes.check_quantization(q) for q in (args.types.split(",") if args.types else ALL_TYPES)]
        print(device_line())
        if args.out:
            Path(args.out).mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=args.out) as directory:
            (write_together if args.together else write_files)(types, config, Path(directory), args.json)
        return
    args.types = args.types or "q8_0,q4_k_m"
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
