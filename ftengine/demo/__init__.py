"""The built-in demo: a tiny Qwen2-architecture model (random initial weights from a config shipped
here), a byte-level BPE tokenizer, and a small instruction dataset and a preference dataset over
the same facts, written for this project.

``ftengine run`` with no config trains it on the CPU in about a minute through the same pipeline
as a real run, exports the adapter and the merged model, and asks the reloaded merged model one
of the training questions. ``ftengine run --demo dpo`` runs DPO on the preference pairs instead
(chosen: the right answer, rejected: a wrong one) and exports the adapter.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

from ftengine.core.config import RunConfig
from ftengine.core.config import validate_config
from ftengine.engine.rundir import atomic_directory

ASSETS = Path(__file__).parent
PROMPT = "What is the capital of Germany?"
EXPECTED_ANSWER = "The capital of Germany is Berlin."
SEED = 1234


def cache_dir() -> Path:
    return Path(os.environ.get("FTENGINE_CACHE", Path.home() / ".cache" / "ftengine"))


def base_model_dir() -> Path:
    """The demo's base model as a Hugging Face directory, built once from the shipped config with a
    fixed seed (so every machine gets the same random weights) and cached."""
    target = cache_dir() / "demo-qwen2-tiny"
    stamp = json.dumps(json.loads((ASSETS / "model_config.json").read_text()), sort_keys=True) + f"seed={SEED}"
    if (target / "ftengine-demo.txt").exists() and (target / "ftengine-demo.txt").read_text() == stamp:
        return target
    import torch
    from transformers import AutoConfig
    from transformers import AutoModelForCausalLM
    from transformers import AutoTokenizer

    config = AutoConfig.for_model(**json.loads((ASSETS / "model_config.json").read_text()))
    torch.manual_seed(SEED)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(str(ASSETS / "tokenizer"))
    with atomic_directory(target, overwrite=True) as staging:
        model.save_pretrained(str(staging))
        tokenizer.save_pretrained(str(staging))
        (staging / "ftengine-demo.txt").write_text(stamp)
    return target


DEMO_KINDS = ("sft", "dpo", "grpo", "vision")


def demo_config(kind: str = "sft") -> RunConfig:
    """The demo's run config: ``sft`` is what ``ftengine run`` alone runs, ``dpo`` and ``grpo`` what
    ``ftengine run --demo dpo`` / ``--demo grpo`` run, ``vision`` the image demo (:mod:`ftengine.demo.vision`).

    Raises:
        ValueError: ``kind`` is not one of :data:`DEMO_KINDS`.
    """
    if kind == "dpo":
        return dpo_demo_config()
    if kind == "grpo":
        return grpo_demo_config()
    if kind == "vision":
        from ftengine.demo.vision import vision_demo_config

        return vision_demo_config()
    if kind != "sft":
        raise ValueError(f"unknown demo {kind!r}; choose one of {', '.join(DEMO_KINDS)}")
    return validate_config({
        "model": {"name_or_path": str(base_model_dir()), "max_seq_length": 128, "dtype": "float32"},
        "lora": {"r": 32, "lora_alpha": 64, "target_modules": "all-linear"},
        "data": {"path": str(ASSETS / "data.jsonl"), "format": "messages", "chat_template": "chatml"},
        "training": {"max_steps": 300, "per_device_train_batch_size": 8, "gradient_accumulation_steps": 1,
                     "learning_rate": 3e-3, "lr_scheduler_type": "cosine", "warmup_steps": 5, "logging_steps": 10,
                     "save_steps": 100, "gradient_checkpointing": False, "seed": SEED},
        "export": [{"format": "lora"}, {"format": "merged", "dtype": "float16"}],
        "output": {"name": "demo"},
    }, source="built-in demo")


def dpo_demo_config() -> RunConfig:
    """DPO with LoRA on the demo's preference pairs; the reference is the model with its adapter off."""
    return validate_config({
        "model": {"name_or_path": str(base_model_dir()), "max_seq_length": 128, "dtype": "float32"},
        "lora": {"r": 16, "lora_alpha": 32, "target_modules": "all-linear"},
        "data": {"path": str(ASSETS / "preference.jsonl"), "format": "preference", "chat_template": "chatml"},
        "training": {"trainer": "dpo", "trainer_options": {"beta": 0.1, "loss_type": "sigmoid"}, "max_steps": 40,
                     "per_device_train_batch_size": 8, "gradient_accumulation_steps": 1, "learning_rate": 1e-3,
                     "lr_scheduler_type": "constant", "logging_steps": 5, "save_steps": 40,
                     "gradient_checkpointing": False, "seed": SEED},
        "export": [{"format": "lora"}],
        "output": {"name": "demo-dpo"},
    }, source="built-in DPO demo")


GRPO_WARMUP_STEPS = 40


def grpo_base_dir() -> Path:
    """The GRPO demo's starting model: the demo base fully fine-tuned for a few seconds on the answers of
    ``arithmetic_warmup.jsonl`` (other sums and differences than the GRPO prompts'), as real GRPO runs
    start from an instruction-tuned model rather than from random weights. It answers with a bare number,
    a wrong one for most GRPO prompts, so that each group of samples holds answers to choose between.
    Trained once through the same pipeline as any SFT run and cached; the stamp names what it came from."""
    target = cache_dir() / "demo-qwen2-tiny-arithmetic"
    base = base_model_dir()
    warmup = ASSETS / "arithmetic_warmup.jsonl"
    stamp = (base / "ftengine-demo.txt").read_text() + f"warmup={GRPO_WARMUP_STEPS}:" + warmup.read_text()
    if (target / "ftengine-demo.txt").exists() and (target / "ftengine-demo.txt").read_text() == stamp:
        return target
    from ftengine.engine import pipeline

    config = validate_config({
        "model": {"name_or_path": str(base), "max_seq_length": 128, "dtype": "float32", "full_finetuning": True},
        "data": {"path": str(warmup), "format": "messages", "chat_template": "chatml"},
        "training": {"max_steps": GRPO_WARMUP_STEPS, "per_device_train_batch_size": 16, "learning_rate": 3e-3,
                     "lr_scheduler_type": "constant", "logging_steps": 10, "save_steps": GRPO_WARMUP_STEPS,
                     "gradient_checkpointing": False, "seed": SEED},
        "export": [{"format": "merged", "dtype": "float16"}],
        "output": {"name": "arithmetic-warmup"},
    }, source="built-in GRPO demo's warm-up")
    with atomic_directory(target, overwrite=True) as staging:
        result = pipeline.run(config, output_dir=staging / "run")
        shutil.copytree(result.run_dir.exports / "merged", staging, dirs_exist_ok=True)
        shutil.rmtree(staging / "run")
        (staging / "ftengine-demo.txt").write_text(stamp)
    return target


def grpo_demo_config() -> RunConfig:
    """GRPO with LoRA on toy arithmetic prompts (``arithmetic.jsonl``: sums and differences of two
    digits, an ``answer`` column and a ``format_pattern`` column asking for the bare number), from the
    warm-started model of :func:`grpo_base_dir`. Rewards: the format check, the exact answer, and the
    demo's own ``closeness`` (partial credit for a near number); the exact-match reward rises over the
    run (``rewards/exact_match/mean`` in metrics.jsonl)."""
    return validate_config({
        "model": {"name_or_path": str(grpo_base_dir()), "max_seq_length": 128, "dtype": "float32"},
        "lora": {"r": 16, "lora_alpha": 32, "target_modules": "all-linear"},
        "data": {"path": str(ASSETS / "arithmetic.jsonl"), "format": "prompt", "chat_template": "chatml"},
        "training": {"trainer": "grpo", "max_steps": 200, "per_device_train_batch_size": 64,
                     "gradient_accumulation_steps": 1, "learning_rate": 1e-3, "lr_scheduler_type": "constant",
                     "logging_steps": 5, "save_steps": 200, "gradient_checkpointing": False, "seed": SEED,
                     "trainer_options": {"reward_funcs": ["format", "exact_match", "ftengine.demo.rewards:closeness"],
                                         "num_generations": 16, "max_completion_length": 4, "temperature": 1.0,
                                         "beta": 0.0, "loss_type": "dapo"}},
        "export": [{"format": "lora"}],
        "output": {"name": "demo-grpo"},
    }, source="built-in GRPO demo")


def arithmetic_prompts() -> list[dict[str, Any]]:
    """The GRPO demo's prompt rows (``arithmetic.jsonl``)."""
    return [json.loads(line) for line in (ASSETS / "arithmetic.jsonl").read_text().splitlines()]


def arithmetic_accuracy(model: Any, tokenizer: Any, rows: list[dict[str, Any]] | None = None) -> float:
    """The share of ``rows`` (default :func:`arithmetic_prompts`) that ``model`` answers exactly right, greedily."""
    import torch

    from ftengine.plugins.trainers.rewards import exact_match

    rows = rows if rows is not None else arithmetic_prompts()
    tokenizer.padding_side = "left"
    batch = tokenizer.apply_chat_template([r["messages"] for r in rows], add_generation_prompt=True,
                                          return_tensors="pt", return_dict=True, padding=True)
    model.eval()
    with torch.no_grad():
        out = model.generate(**batch, max_new_tokens=4, do_sample=False, pad_token_id=tokenizer.pad_token_id,
                             eos_token_id=tokenizer.eos_token_id)
    answers = tokenizer.batch_decode(out[:, batch["input_ids"].shape[1]:], skip_special_tokens=True)
    return sum(exact_match(answers, [r["answer"] for r in rows])) / len(rows)


def grpo_report(adapter_dir: Path) -> str:
    """Greedy accuracy on the GRPO prompts of the warm start, then with the trained adapter (reloaded with peft)."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM
    from transformers import AutoTokenizer

    base = grpo_base_dir()
    tokenizer = AutoTokenizer.from_pretrained(str(base))
    model = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32)
    rows = arithmetic_prompts()
    before = arithmetic_accuracy(model, tokenizer, rows)
    after = arithmetic_accuracy(PeftModel.from_pretrained(model, str(adapter_dir)), tokenizer, rows)
    return (f"\nexact answers to the {len(rows)} GRPO prompts (greedy): {before:.0%} before GRPO, {after:.0%} "
            "with the trained adapter (reloaded with peft)")


def ask(model_dir: Path, question: str = PROMPT, max_new_tokens: int = 24) -> str:
    """Greedy answer of a model directory (reloaded with plain transformers) to one question."""
    import torch
    from transformers import AutoModelForCausalLM
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    model.eval()
    ids = tokenizer.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                        return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=max_new_tokens, do_sample=False,
                             eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    return tokenizer.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True).strip()


def clear_cache() -> None:
    for name in ("demo-qwen2-tiny", "demo-qwen2-tiny-arithmetic"):
        shutil.rmtree(cache_dir() / name, ignore_errors=True)
