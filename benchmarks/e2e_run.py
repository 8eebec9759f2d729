"""The ``ftengine-run`` rows of ``e2e.py``: ``ftengine run config.yaml`` itself, in a child process.

The same random-weight model as the bare-loop rows is written once as a checkpoint (bf16
safetensors plus the demo's byte-level tokenizer: ids below 640, which the timing does not depend
on) under ``--model-cache``; a JSONL chat dataset of random words is written beside the run; the
config trains the same LoRA (r=16 on the same projections) with the SFT trainer, the chatml
template, gradient checkpointing and no export. ``ftengine-run`` packs the rows into full
sequences (about four conversations each); ``ftengine-run-unpacked`` trains one conversation a row,
of mixed lengths between an eighth of the sequence and all of it (padding up to the longest row of
the micro-batch). Step time and tokens/s come from the run's ``metrics.jsonl`` (the trainer's own
count of the tokens that are not padding): medians over the steps after the warm-up; the peak is the process's peak
allocated GPU memory, loading included.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from common import LORA
from common import random_text

TOKENIZER_VOCAB = 640  # the demo tokenizer's


def model_dir(name: str, layers: int | None, cache: Path, build: Any) -> Path:
    """The checkpoint of ``build(name, "none", "hf", layers)`` (written on first use, then reused)."""
    path = cache / f"{name}-{layers or 'full'}"
    if (path / "config.json").exists():
        return path
    import torch

    from ftengine.demo import ASSETS

    cache.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=cache, prefix=f".{path.name}-"))
    model = build(name, "none", "hf", layers)
    if model.config.vocab_size < TOKENIZER_VOCAB:
        raise ValueError(f"{name}: vocabulary {model.config.vocab_size} < the demo tokenizer's {TOKENIZER_VOCAB}")
    model.save_pretrained(str(staging), max_shard_size="4GB")
    del model
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    for file in (ASSETS / "tokenizer").iterdir():
        shutil.copy(file, staging / file.name)
    staging.rename(path)
    return path


def chat_rows(seq: int, n_rows: int, packed: bool, seed: int = 0) -> list[dict]:
    """``messages`` rows of random words: a little under ``seq / 4`` tokens each when ``packed`` (four fill a
    row; at ``seq / 4`` the template's tokens made them one too long, and three a row left a quarter empty),
    else ``seq / 8`` to ``seq``."""
    from transformers import AutoTokenizer

    from ftengine.demo import ASSETS

    tokenizer = AutoTokenizer.from_pretrained(str(ASSETS / "tokenizer"))
    rng = random.Random(seed)
    rows = []
    for _ in range(n_rows):
        total = max(seq // 4 - 16, 16) if packed else rng.randint(seq // 8, seq - 16)  # room for the template's tokens
        prompt = max(1, total // 8)
        rows.append({"messages": [{"role": "user", "content": random_text(tokenizer, prompt, rng)},
                                  {"role": "assistant", "content": random_text(tokenizer, total - prompt - 12, rng)}]})
    return rows


def run_config(model: Path, data: Path, out: Path, quant: str, micro_batch: int, seq: int, steps: int,
               packed: bool, on_gpu: bool, attention: str = "auto") -> dict:
    """The run's config: the bare loop's LoRA (``all-linear``: the model adapter's projections, the experts'
    included), checkpointing and optimizer, the SFT trainer, no export. Attention is the run's default
    (``auto``: FlexAttention over packed rows on a GPU, so no attention crosses a sample; sdpa otherwise) unless
    ``attention`` names one."""
    return {
        "model": {"name_or_path": str(model), "max_seq_length": seq, "dtype": "bfloat16" if on_gpu else "float32",
                  "attn_implementation": attention},
        "quantization": {"load_in_4bit": quant == "nf4"},
        "lora": {"r": LORA["r"], "lora_alpha": LORA["lora_alpha"], "lora_dropout": LORA["lora_dropout"],
                 "target_modules": "all-linear"},
        "data": {"path": str(data), "format": "messages", "chat_template": "chatml", "packing": packed},
        "training": {"max_steps": steps, "per_device_train_batch_size": micro_batch, "gradient_accumulation_steps": 1,
                     "learning_rate": 1e-4, "logging_steps": 1, "save_steps": 100000, "gradient_checkpointing": True,
                     "seed": 0},
        "export": [],
        "output": {"dir": str(out / "runs"), "name": "e2e"},
    }


def timed(records: list[dict], warmup: int) -> dict:
    """Step time, tokens/s, peak and losses from ``metrics.jsonl`` records (one per step), after ``warmup`` steps:
    medians over the timed steps, as the bare rows' (a step that compiles a kernel for a new length, say, moves
    a mean but not the median)."""
    steps = [r for r in records if "loss" in r and "elapsed_seconds" in r]
    timed_steps = list(zip(steps[max(warmup - 1, 0):], steps[max(warmup, 1):], strict=False))
    if not timed_steps:
        raise ValueError(f"{len(steps)} logged steps: none after the {warmup} warm-up step(s)")
    seconds = [(b["elapsed_seconds"] - a["elapsed_seconds"]) / (b["step"] - a["step"]) for a, b in timed_steps]
    tokens = [(b["tokens_seen"] - a["tokens_seen"]) / (b["step"] - a["step"]) for a, b in timed_steps]
    return dict(step_s=statistics.median(seconds),
                tokens_per_s=statistics.median(t / s for t, s in zip(tokens, seconds, strict=True)),
                tokens_per_step=statistics.mean(tokens),
                peak_alloc_gib=max(float(r["peak_memory_gib"]) for r in steps),
                losses=[round(r["loss"], 4) for r in steps if r["loss"] is not None])


def run_cli(name: str, framework: str, micro_batch: int, quant: str, seq: int, steps: int, warmup: int,
            layers: int | None, cache: Path, build: Any, on_gpu: bool, attention: str = "auto") -> dict:
    """One ``ftengine run`` of ``warmup + steps`` steps; the row's figures from its metrics."""
    packed = framework == "ftengine-run"
    model = model_dir(name, layers, cache, build)
    with tempfile.TemporaryDirectory(prefix="ftengine-e2e-run-") as tmp:
        out = Path(tmp)
        total = steps + warmup
        rows = chat_rows(seq, total * micro_batch * (6 if packed else 2), packed)
        data = out / "chat.jsonl"
        data.write_text("".join(json.dumps(row) + "\n" for row in rows))
        config = out / "config.yaml"
        settings = run_config(model, data, out, quant, micro_batch, seq, total, packed, on_gpu, attention)
        config.write_text(json.dumps(settings, indent=1))  # JSON is YAML
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
        result = subprocess.run([sys.executable, "-m", "ftengine", "run", str(config)], env=env, capture_output=True,
                                text=True, check=False)
        metrics = sorted((out / "runs").glob("*/metrics.jsonl"))
        if result.returncode != 0 or not metrics:
            tail = (result.stderr or result.stdout).strip().splitlines()[-3:]
            raise RuntimeError(f"ftengine run exited {result.returncode}: " + " | ".join(tail))
        records = [json.loads(line) for line in metrics[0].read_text().splitlines() if line.strip()]
        log = (result.stdout + result.stderr).splitlines()
        notes = [line.strip() for line in log if "patched by" in line or "LoRA r=" in line or "attention:" in line]
    return dict(timed(records, warmup), patched=notes, checkpointing="ftengine run (training.gradient_checkpointing)")
