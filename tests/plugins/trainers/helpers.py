"""Building blocks of the trainer tests: the demo model with a fresh LoRA adapter, datasets of each
kind from the demo's files, and a trainer built by its plugin without running it."""

from __future__ import annotations

import json
from pathlib import Path

import ftengine
from ftengine.core import plugins
from ftengine.core.config import TrainingConfig
from ftengine.core.types import TrainRequest
from ftengine.demo import ASSETS


def lora_model(base, r=4, seed=0, full_finetuning=False):
    import torch

    model, tokenizer = ftengine.load_model(str(base), max_seq_length=64, dtype="float32",
                                           full_finetuning=full_finetuning)
    if not full_finetuning:
        torch.manual_seed(seed)
        model = ftengine.add_lora(model, r=r, lora_alpha=2 * r, use_gradient_checkpointing=False)
        # a non-zero adapter, so that the policy differs from the reference
        with torch.no_grad():
            for name, param in model.named_parameters():
                if "lora_B" in name:
                    param.normal_(0, 0.05)
    return model, tokenizer


def kto_file(tmp_path: Path, rows: int = 8) -> Path:
    """The demo's preference pairs as unpaired rows: chosen desirable, rejected not."""
    pairs = [json.loads(line) for line in (ASSETS / "preference.jsonl").read_text().splitlines()][: rows // 2]
    out = tmp_path / "kto.jsonl"
    out.write_text("".join(json.dumps({"prompt": p["prompt"], "completion": p[side], "label": side == "chosen"}) + "\n"
                           for p in pairs for side in ("chosen", "rejected")))
    return out


DATA = {"dpo": lambda tmp: ASSETS / "preference.jsonl", "orpo": lambda tmp: ASSETS / "preference.jsonl",
        "kto": kto_file, "grpo": lambda tmp: ASSETS / "arithmetic.jsonl"}


def dataset(name, tokenizer, tmp_path, rows=8):
    return ftengine.load_dataset(str(DATA[name](tmp_path)), tokenizer, trainer=name, max_seq_length=64,
                                 chat_template="chatml", max_rows=rows)


def build(name, model, tokenizer, train_dataset, tmp_path, options=None, **training):
    """The plugin's trainer (not run), as the pipeline's train stage would create it."""
    plugin = plugins.get("trainers", name)
    config = TrainingConfig(trainer=name, trainer_options=options or {}, max_steps=1,
                            per_device_train_batch_size=4, gradient_accumulation_steps=1,
                            gradient_checkpointing=False, **training)
    schema = plugin.options_schema
    request = TrainRequest(model=model, tokenizer=tokenizer, train_dataset=train_dataset, eval_dataset=None,
                           training=config, output_dir=tmp_path / "checkpoints", max_seq_length=64,
                           options=schema.model_validate(options or {}) if schema else None)
    return plugin.create(request)
