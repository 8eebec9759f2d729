"""Preference and RL training steps: ftengine's trainers vs trl + transformers + PEFT, same run.

Both sides train the same random-weight Qwen2.5-7B-shaped model (NF4 QLoRA projections on the GPU,
LoRA r=16 on every projection, gradient checkpointing of every decoder layer, AdamW on the
adapters) with the same trl trainer and the same data:

- ``trl``: transformers' modules as they come, trl's trainer as it comes (its own chunked LM head
  for DPO / GRPO log-probabilities, full logits for ORPO);
- ``ftengine``: the model adapter's patch (the Triton ops on a GPU), ftengine's trainer plugin
  (log-probabilities through the ``token_logprobs`` op, ORPO without full logits, GRPO's completions
  sampled through the engine's static KV cache and CUDA-graph step) and ftengine's gradient
  checkpointing of every layer;
- ``ftengine-auto`` / ``ftengine-offload``: the same with ftengine's ``auto`` checkpointing (only the
  layers whose activations do not fit in the card's free memory, the training default) or ``offload``.

Workloads: ``grpo`` (prompts of 128 tokens, 8 generations x 512 new tokens each, micro-batch 8:
one prompt group a step, the reference with the adapter off, beta 0.04), ``dpo`` and ``orpo``
(prompt 1024 + answer 1024 tokens = sequence 2048, micro-batch 4 pairs). The tokens come from
the demo's byte-level tokenizer (ids below 640; the timing does not depend on which ids).
Random weights never emit the end-of-sequence token, so every GRPO completion runs to 512.

Each workload x framework runs in its own process; per run: the median step time over the timed
steps (GRPO's includes its generation) and the peak allocated GPU memory over the steps.

GPU, one command per workload so that each stays under 10 minutes (the table is printed; JSON lines
in ``--out``): ``PYTHONPATH=. python benchmarks/rl.py --workloads grpo --out rl-grpo.jsonl``, then
``--workloads dpo --out rl-dpo.jsonl`` and ``--workloads orpo --out rl-orpo.jsonl``.
CPU smoke test at tiny shapes: ``PYTHONPATH=. python benchmarks/rl.py --tiny --out /tmp/rl.jsonl``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from common import attach_lora  # noqa: E402
from common import random_text  # noqa: E402

QWEN_7B = dict(model_type="qwen2", hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
               num_attention_heads=28, num_key_value_heads=4, vocab_size=152064, rms_norm_eps=1e-6,
               max_position_embeddings=32768, rope_theta=1000000.0, tie_word_embeddings=False)
TINY = dict(model_type="qwen2", hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=640, rms_norm_eps=1e-6, max_position_embeddings=512,
            tie_word_embeddings=False)
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
WORKLOADS = ("grpo", "dpo", "orpo")
FRAMEWORKS = ("trl", "ftengine")
CHOICES = FRAMEWORKS + ("ftengine-auto", "ftengine-offload")
GIB = 1024**3


def shapes(tiny: bool) -> dict:
    if tiny:
        return dict(model=TINY, prompt=16, answer=16, generations=4, new_tokens=8, micro_batch=2, steps=2, warmup=1)
    return dict(model=QWEN_7B, prompt=1024, answer=1024, generations=8, new_tokens=512, micro_batch=4, steps=2,
                warmup=1, grpo_prompt=128)


def dataset(workload: str, tokenizer, s: dict, rows: int):
    import datasets

    rng = random.Random(0)
    if workload == "grpo":
        n = s.get("grpo_prompt", s["prompt"])
        return datasets.Dataset.from_list([{"prompt": [{"role": "user", "content": random_text(tokenizer, n, rng)}]}
                                           for _ in range(rows)])
    return datasets.Dataset.from_list([{
        "prompt": [{"role": "user", "content": random_text(tokenizer, s["prompt"], rng)}],
        "chosen": [{"role": "assistant", "content": random_text(tokenizer, s["answer"], rng)}],
        "rejected": [{"role": "assistant", "content": random_text(tokenizer, s["answer"], rng)}],
    } for _ in range(rows)])


def build(framework: str, s: dict, device: str):
    """The random-weight model, patched (ftengine), NF4 on the GPU, with LoRA and checkpointing."""
    import torch
    from transformers import AutoConfig
    from transformers import AutoModelForCausalLM

    from ftengine.core.plugins import adapter_for_model_type

    spec = dict(s["model"])
    config = AutoConfig.for_model(spec.pop("model_type"), **spec, bos_token_id=0, eos_token_id=2, pad_token_id=0)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="sdpa")
    if device == "cuda":
        from e2e import quantize_projections

        quantize_projections(model)
    return attach_lora(model, framework, TARGETS, adapter_for_model_type("qwen2"))[0]


def trainer_for(workload: str, framework: str, model, tokenizer, data, s: dict, out_dir: str, callbacks: list):
    """The trl trainer as it comes (``trl``) or as ftengine's trainer plugin builds it."""
    from ftengine.core.config import TrainingConfig
    from ftengine.core.plugins import get
    from ftengine.core.types import TrainRequest
    from ftengine.engine import static_decode

    steps = s["steps"] + s["warmup"]
    options = {"dpo": {"beta": 0.1}, "orpo": {"beta": 0.1},
               "grpo": {"reward_funcs": ["length_penalty"], "num_generations": s["generations"],
                        "max_completion_length": s["new_tokens"], "beta": 0.04}}[workload]
    micro_batch = s["generations"] if workload == "grpo" else s["micro_batch"]
    training = TrainingConfig(trainer=workload, trainer_options=options, max_steps=steps,
                              per_device_train_batch_size=micro_batch, gradient_accumulation_steps=1,
                              learning_rate=1e-5, save_steps=10_000, logging_steps=1, gradient_checkpointing=False)
    plugin = get("trainers", workload)
    max_seq_length = s["prompt"] + s["answer"]
    if framework.startswith("ftengine"):
        request = TrainRequest(model=model, tokenizer=tokenizer, train_dataset=data, eval_dataset=None,
                               training=training, output_dir=Path(out_dir), callbacks=callbacks,
                               max_seq_length=max_seq_length,
                               options=plugin.options_schema.model_validate(options),
                               route_generate=static_decode.route_for_backend)
        return plugin.create(request)
    return plain_trl(workload, model, tokenizer, data, training, plugin.options_schema.model_validate(options),
                     out_dir, callbacks, max_seq_length)


def plain_trl(workload, model, tokenizer, data, training, options, out_dir, callbacks, max_seq_length):
    from ftengine.plugins.trainers.arguments import common_arguments

    args = common_arguments(training, out_dir, model)
    if workload == "dpo":
        from trl import DPOConfig
        from trl import DPOTrainer

        config = DPOConfig(**args, beta=options.beta, max_length=max_seq_length)
        return DPOTrainer(model=model, args=config, train_dataset=data, processing_class=tokenizer,
                          callbacks=callbacks)
    if workload == "orpo":
        from trl.experimental.orpo import ORPOConfig
        from trl.experimental.orpo import ORPOTrainer

        config = ORPOConfig(**args, beta=options.beta, max_length=max_seq_length)
        return ORPOTrainer(model=model, args=config, train_dataset=data, processing_class=tokenizer,
                           callbacks=callbacks)
    from trl import GRPOConfig
    from trl import GRPOTrainer

    from ftengine.plugins.trainers.rewards import checked_reward
    from ftengine.plugins.trainers.rewards import length_penalty

    config = GRPOConfig(**args, num_generations=options.num_generations,
                        max_completion_length=options.max_completion_length, beta=options.beta)
    reward = checked_reward("length_penalty", length_penalty)  # the same reward, given the completions' texts
    return GRPOTrainer(model=model, reward_funcs=[reward], args=config, train_dataset=data,
                       processing_class=tokenizer, callbacks=callbacks)


def run(workload: str, framework: str, tiny: bool) -> dict:
    import torch
    from transformers import AutoTokenizer
    from transformers import TrainerCallback

    from ftengine.demo import ASSETS
    from ftengine.engine.templates import apply_chat_template

    device = "cuda" if torch.cuda.is_available() else "cpu"
    s = shapes(tiny)
    tokenizer = AutoTokenizer.from_pretrained(str(ASSETS / "tokenizer"))
    apply_chat_template(tokenizer, "chatml")
    rows = (s["steps"] + s["warmup"]) * (1 if workload == "grpo" else s["micro_batch"])
    data = dataset(workload, tokenizer, s, rows)
    model = build(framework, s, device)
    times: list[float] = []

    class Timer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            if device == "cuda":
                torch.cuda.synchronize()
            self.start = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            if device == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - self.start)

    with tempfile.TemporaryDirectory() as out_dir:
        trainer = trainer_for(workload, framework, model, tokenizer, data, s, out_dir, [Timer()])
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        trainer.train()
    losses = [round(e["loss"], 4) for e in trainer.state.log_history if "loss" in e]
    return dict(workload=workload, framework=framework, device=device, tiny=tiny,
                step_s=statistics.median(times[s["warmup"]:]), steps=len(times) - s["warmup"],
                peak_alloc_gib=torch.cuda.max_memory_allocated() / GIB if device == "cuda" else None,
                losses=losses)


def environment() -> str:
    import peft
    import torch
    import transformers
    import trl

    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
    return (f"{device}; torch {torch.__version__}, transformers {transformers.__version__}, peft {peft.__version__}, "
            f"trl {trl.__version__}; {datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC")


def table(rows: list[dict], device_line: str) -> str:
    lines = [f"Device: {device_line}", "", "| workload | framework | step s (median) | peak GiB | vs trl |",
             "|---|---|---|---|---|"]
    base = {r["workload"]: r for r in rows if r["framework"] == "trl" and "error" not in r}
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['workload']} | {r['framework']} | error: {r['error'][:80]} | | |")
            continue
        ref = base.get(r["workload"])
        speed = f"{ref['step_s'] / r['step_s']:.2f}x" if ref else ""
        peak = f"{r['peak_alloc_gib']:.2f}" if r["peak_alloc_gib"] is not None else "-"
        lines.append(f"| {r['workload']} | {r['framework']} | {r['step_s']:.3f} | {peak} | {speed} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="JSON lines, one per workload x framework")
    parser.add_argument("--workloads", default=",".join(WORKLOADS))
    parser.add_argument("--frameworks", default=",".join(FRAMEWORKS))
    parser.add_argument("--tiny", action="store_true", help="tiny shapes (the CPU smoke test)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)  # workload:framework, in a child process
    args = parser.parse_args()
    unknown = sorted(set(args.frameworks.split(",")) - set(CHOICES))
    if unknown:
        parser.error(f"--frameworks: unknown {', '.join(unknown)}; expected some of {', '.join(CHOICES)}")
    if args.worker:
        workload, framework = args.worker.split(":")
        try:
            row = run(workload, framework, args.tiny)
        except Exception as exc:  # noqa: BLE001 - one failed run must not stop the others
            row = dict(workload=workload, framework=framework, error=f"{type(exc).__name__}: {exc}"[:300])
        with args.out.open("a") as out:
            out.write(json.dumps(row) + "\n")
        return
    args.out.unlink(missing_ok=True)
    for workload in args.workloads.split(","):
        for framework in args.frameworks.split(","):
            command = [sys.executable, __file__, "--out", str(args.out), "--worker", f"{workload}:{framework}"]
            subprocess.run(command + (["--tiny"] if args.tiny else []), check=False)
    rows = [json.loads(line) for line in args.out.read_text().splitlines()]
    print(table(rows, environment()))


if __name__ == "__main__":
    main()
