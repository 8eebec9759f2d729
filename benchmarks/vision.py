"""Vision-language LoRA / QLoRA training steps: ftengine vs plain transformers + PEFT, Qwen2.5-VL / Llama 3.2 Vision.

Both frameworks run over the same random-weight Qwen2.5-VL-7B-shaped model (28 text layers, a 32-block
ViT), the same LaTeX-OCR-shaped batches (one formula image of about 392x84 pixels per row, i.e. 6x28
patches merged into 42 image tokens, an instruction before it and ~60 LaTeX tokens after it, labels on
the LaTeX only), the same LoRA (r=16, alpha=16, every attention and MLP projection of both towers, the
merger excluded), SDPA attention, AdamW on the adapters and non-reentrant gradient checkpointing of
every layer:

- ``hf``: transformers + PEFT as they come (the loss from full logits);
- ``ftengine``: the ``qwen2_5_vl`` adapter's patch (language tower on the kernel ops, fused LM-head
  loss; in the vision tower the RMSNorms, gated MLPs and the attention of every window in one call), then
  PEFT, then :func:`ftengine.engine.memory.checkpointing.apply_gradient_checkpointing`.

QLoRA quantizes the language tower's projections to NF4 (the vision tower and merger stay bf16, as
ftengine's QLoRA leaves them). Per run: tokens/s (text + image tokens) and seconds a step (median of
the timed steps), peak allocated GPU memory, each step's loss.

``--arch mllama`` runs a random-weight Llama-3.2-11B-Vision-shaped model instead (40 text layers, 8 of
them cross-attention, a 32 + 8-layer ViT on 560x560 tiles): each row holds one ``<|image|>`` token and
its formula image as one tile, whose 1,601 patch features the cross-attention layers read; the LoRA
covers both towers' projections and the cross-attention layers'. QLoRA quantizes the language tower's
self- and cross-attention and MLP projections.

GPU: ``python benchmarks/vision.py --out vision.jsonl`` (LoRA and QLoRA at micro-batches 4 and 8, both
frameworks; about 6 minutes on an H100), ``python benchmarks/vision.py --arch mllama --out vision.jsonl``
(the same for Llama 3.2 Vision at micro-batches 1 and 2), then ``python benchmarks/vision.py --report
vision.jsonl`` prints the table. CPU smoke run at a tiny shape: ``python benchmarks/vision.py --tiny
--device cpu [--arch mllama]``.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import e2e  # noqa: E402  (the NF4 projection swap and the environment line are shared with the text benchmark)
from common import attach_lora  # noqa: E402

TEXT_7B = dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
               num_key_value_heads=4, vocab_size=152064, rms_norm_eps=1e-6, max_position_embeddings=32768,
               rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [16, 24, 24]})
VISION_7B = dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, patch_size=14, spatial_merge_size=2,
                 temporal_patch_size=2, out_hidden_size=3584, window_size=112, fullatt_block_indexes=[7, 15, 23, 31])
TEXT_TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=512, rms_norm_eps=1e-6, max_position_embeddings=512,
                 rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]})
VISION_TINY = dict(depth=2, hidden_size=64, intermediate_size=128, num_heads=2, patch_size=14, spatial_merge_size=2,
                   temporal_patch_size=2, out_hidden_size=64, window_size=56, fullatt_block_indexes=[1])
GRID = (1, 6, 28)  # patches of one ~392x84 formula image
PROMPT_TOKENS, LATEX_TOKENS = 20, 60
SPECIAL = 4  # the last ids of the vocabulary: vision start / end, image, video


MLLAMA_TEXT_11B = dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=40, num_attention_heads=32,
                       num_key_value_heads=8, vocab_size=128256, rms_norm_eps=1e-5, max_position_embeddings=131072,
                       cross_attention_layers=[3, 8, 13, 18, 23, 28, 33, 38],
                       rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                                        "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                        "original_max_position_embeddings": 8192})
MLLAMA_VISION_11B = dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_global_layers=8,
                         attention_heads=16, vision_output_dim=7680, image_size=560, patch_size=14, max_num_tiles=4,
                         intermediate_layers_indices=[3, 7, 15, 23, 30])
MLLAMA_TEXT_TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
                        num_key_value_heads=2, vocab_size=512, cross_attention_layers=[1], pad_token_id=0,
                        bos_token_id=1, eos_token_id=2,
                        rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
MLLAMA_VISION_TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_global_layers=1,
                          attention_heads=2, vision_output_dim=128, image_size=28, patch_size=14, max_num_tiles=2,
                          intermediate_layers_indices=[0], supported_aspect_ratios=[[1, 1], [1, 2], [2, 1]])
MODEL_NAMES = {"qwen2_5_vl": "qwen2.5-vl-7b", "mllama": "llama-3.2-11b-vision"}


def build(tiny: bool, quant: str, device: str, arch: str = "qwen2_5_vl"):
    if arch == "mllama":
        return build_mllama(tiny, quant, device)
    import torch
    from transformers import Qwen2_5_VLConfig
    from transformers import Qwen2_5_VLForConditionalGeneration

    text, vis = (TEXT_TINY, VISION_TINY) if tiny else (TEXT_7B, VISION_7B)
    vocab = text["vocab_size"]
    config = Qwen2_5_VLConfig(text_config=dict(text), vision_config=dict(vis), vision_start_token_id=vocab - 4,
                              vision_end_token_id=vocab - 3, image_token_id=vocab - 2, video_token_id=vocab - 1)
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    torch.manual_seed(0)
    with torch.device(device):
        model = Qwen2_5_VLForConditionalGeneration._from_config(config, dtype=dtype, attn_implementation="sdpa")
    model.config.use_cache = False
    if quant == "nf4":
        e2e.DEVICE = device
        e2e.quantize_projections(type("Tower", (), {"model": model.model.language_model})())
    return model


def build_mllama(tiny: bool, quant: str, device: str):
    import torch
    from transformers import MllamaConfig
    from transformers import MllamaForConditionalGeneration

    text, vis = (MLLAMA_TEXT_TINY, MLLAMA_VISION_TINY) if tiny else (MLLAMA_TEXT_11B, MLLAMA_VISION_11B)
    config = MllamaConfig(text_config=dict(text), vision_config=dict(vis), image_token_index=text["vocab_size"])
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    torch.manual_seed(0)
    with torch.device(device):
        model = MllamaForConditionalGeneration._from_config(config, dtype=dtype, attn_implementation="sdpa")
        for name, param in model.named_parameters():  # open the cross-attention gates (0 at initialisation)
            if name.endswith(("cross_attn_attn_gate", "cross_attn_mlp_gate")):
                param.data.fill_(0.5)
    model.config.use_cache = False
    if quant == "nf4":
        e2e.DEVICE = device
        e2e.quantize_projections(type("Tower", (), {"model": model.model.language_model})())
    return model


def mllama_batch(config, micro_batch: int, device: str, seed: int = 0) -> dict:
    """LaTeX-OCR-shaped rows for Llama 3.2 Vision: ``<|image|>``, prompt, LaTeX; the image one tile (aspect
    ratio 1x1) that every token after ``<|image|>`` attends to; labels on the LaTeX."""
    import torch

    g = torch.Generator().manual_seed(seed)
    vocab, vis = config.text_config.vocab_size, config.vision_config
    prompt = torch.randint(0, vocab, (micro_batch, PROMPT_TOKENS), generator=g)
    latex = torch.randint(0, vocab, (micro_batch, LATEX_TOKENS), generator=g)
    ids = torch.cat([torch.full((micro_batch, 1), config.image_token_index), prompt, latex], dim=1)
    labels = torch.full_like(ids, -100)
    labels[:, -LATEX_TOKENS:] = ids[:, -LATEX_TOKENS:]
    tiles = vis.max_num_tiles
    pixels = torch.randn(micro_batch, 1, tiles, 3, vis.image_size, vis.image_size, generator=g)
    tile_mask = torch.zeros(micro_batch, 1, tiles, dtype=torch.long)
    tile_mask[..., 0] = 1
    cross = tile_mask.unsqueeze(1).expand(-1, ids.shape[1], -1, -1).clone()  # (B, T, images, tiles)
    out = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels, "pixel_values": pixels,
           "aspect_ratio_ids": torch.ones(micro_batch, 1, dtype=torch.long), "aspect_ratio_mask": tile_mask,
           "cross_attention_mask": cross}
    return {k: v.to(device) for k, v in out.items()}


def batch(config, micro_batch: int, device: str, seed: int = 0) -> dict:
    """LaTeX-OCR-shaped rows: prompt, vision start, the image's tokens, vision end, LaTeX; labels on the LaTeX."""
    import torch

    g = torch.Generator().manual_seed(seed)
    vocab = config.text_config.vocab_size
    merged = GRID[0] * GRID[1] * GRID[2] // 4
    rows = []
    for _ in range(micro_batch):
        prompt = torch.randint(0, vocab - SPECIAL, (PROMPT_TOKENS,), generator=g)
        latex = torch.randint(0, vocab - SPECIAL, (LATEX_TOKENS,), generator=g)
        image = torch.full((merged,), config.image_token_id)
        rows.append(torch.cat([prompt, torch.tensor([config.vision_start_token_id]), image,
                               torch.tensor([config.vision_end_token_id]), latex]))
    ids = torch.stack(rows)
    labels = torch.full_like(ids, -100)
    labels[:, -LATEX_TOKENS:] = ids[:, -LATEX_TOKENS:]
    patch_dim = 3 * config.vision_config.temporal_patch_size * config.vision_config.patch_size ** 2
    pixels = torch.randn(micro_batch * GRID[0] * GRID[1] * GRID[2], patch_dim, generator=g)
    return {"input_ids": ids.to(device), "attention_mask": torch.ones_like(ids).to(device), "labels": labels.to(device),
            "pixel_values": pixels.to(device), "image_grid_thw": torch.tensor([GRID] * micro_batch).to(device),
            "mm_token_type_ids": (ids == config.image_token_id).long().to(device)}


def prepare(framework: str, tiny: bool, quant: str, device: str, arch: str = "qwen2_5_vl"):
    import torch

    from ftengine.core.plugins import get_registry

    model = build(tiny, quant, device, arch)
    adapter = get_registry("models")[arch]
    model = attach_lora(model, framework, adapter.vision.target_modules(), adapter, task_type=None)[0]
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    return model, optimizer


def run(framework: str, micro_batch: int, quant: str, tiny: bool, device: str, steps: int, warmup: int,
        arch: str = "qwen2_5_vl") -> dict:
    import torch

    model, optimizer = prepare(framework, tiny, quant, device, arch)
    inputs = (mllama_batch if arch == "mllama" else batch)(model.config, micro_batch, device)
    losses, times = [], []
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    for step in range(warmup + steps):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        loss = model(**inputs).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device == "cuda":
            torch.cuda.synchronize()
        if step >= warmup:
            times.append(time.perf_counter() - start)
        losses.append(round(loss.item(), 4))
    seconds = statistics.median(times)
    tokens = inputs["input_ids"].numel()
    row = {"framework": framework, "model": f"tiny {arch}" if tiny else MODEL_NAMES[arch], "quant": quant,
           "micro_batch": micro_batch, "tokens_per_step": tokens, "seconds_per_step": round(seconds, 4),
           "tokens_per_second": round(tokens / seconds, 1), "losses": losses,
           "peak_allocated_gib": round(torch.cuda.max_memory_allocated() / e2e.GIB, 2) if device == "cuda" else None,
           "device": e2e.environment() if device == "cuda" else "cpu",
           "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    del model, optimizer
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
    return row


def report(rows: list[dict]) -> str:
    """A markdown table: each (mode, micro-batch) with HF + PEFT and ftengine side by side."""
    lines = ["| model, mode, micro-batch | HF + PEFT tok/s | ftengine tok/s | speed-up | peak GiB: HF / ftengine |",
             "|---|---|---|---|---|"]
    keyed = {(r["model"], r["quant"], r["micro_batch"], r["framework"]): r for r in rows}
    for model, quant, micro_batch in sorted({(r["model"], r["quant"], r["micro_batch"]) for r in rows}):
        hf, ours = keyed.get((model, quant, micro_batch, "hf")), keyed.get((model, quant, micro_batch, "ftengine"))
        if hf is None or ours is None:
            continue
        mode = "QLoRA" if quant == "nf4" else "LoRA"
        lines.append(f"| {model}, {mode}, {micro_batch} | {hf['tokens_per_second']:,.0f} | "
                     f"{ours['tokens_per_second']:,.0f} | {ours['tokens_per_second'] / hf['tokens_per_second']:.2f}x | "
                     f"{hf['peak_allocated_gib']} / {ours['peak_allocated_gib']} |")
    return "\n".join(lines + ["", f"device: {rows[0]['device']}"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="a two-layer model (a CPU smoke run)")
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    parser.add_argument("--arch", default="qwen2_5_vl", choices=sorted(MODEL_NAMES))
    parser.add_argument("--micro-batches", type=int, nargs="+",
                        help="default: 4 and 8 (Qwen2.5-VL), 1 and 2 (mllama: at 4 HF + PEFT outgrows 80 GB)")
    parser.add_argument("--quant", nargs="+", default=["none", "nf4"], choices=("none", "nf4"))
    parser.add_argument("--frameworks", nargs="+", default=["hf", "ftengine"], choices=("hf", "ftengine"))
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--out", type=Path, help="append JSON rows here")
    parser.add_argument("--report", type=Path, help="print the table of a JSON-rows file and exit")
    args = parser.parse_args()
    if args.report:
        print(report([json.loads(line) for line in args.report.read_text().splitlines() if line.strip()]))
        return
    micro_batches = args.micro_batches or ([1, 2] if args.arch == "mllama" else [4, 8])
    rows = []
    for quant in args.quant:
        for micro_batch in micro_batches:
            for framework in args.frameworks:
                row = run(framework, micro_batch, quant, args.tiny, args.device, args.steps, args.warmup, args.arch)
                print(json.dumps(row), flush=True)
                rows.append(row)
                if args.out:
                    with args.out.open("a") as f:
                        f.write(json.dumps(row) + "\n")
    print(report(rows))


if __name__ == "__main__":
    main()
