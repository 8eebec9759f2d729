"""Where a training step of ``ftengine.train`` (what ``ftengine run`` calls) goes beyond the bare loop's.

One model is loaded once, as ``ftengine run`` loads it (the e2e rows' random-weight checkpoint, QLoRA or
LoRA r=16 on every projection, standard checkpointing), with the e2e rows' packed chat data. Then, on that
model, each variant trains ``--warmup + --steps`` steps and the median step time after the warm-up is
reported (a callback synchronises the GPU at every step end; the bare loops read the loss back each step):

- ``bare``: forward, backward, AdamW step and ``zero_grad`` over the batches the run's own data loader yields
  (packed rows: position ids restart at each sample);
- ``bare-causal``: the same batches without position ids: one causal sequence a row, as the e2e bare rows;
- ``train``: ``ftengine.train`` as it is;
- ``train-walks``: the same with the module tree walked at every step as the Hugging Face trainer walks it
  (:mod:`ftengine.engine.module_tree` off), to measure what that cache saves;
- ``train-<without>``: ``ftengine.train`` with one piece of the trainer's per-step work taken away:
  ``autocast`` (the accelerate bf16 autocast wrapper of the model's forward), ``guard`` (the non-finite guard's
  checks and read-backs), ``clip`` (gradient clipping), ``tokens`` (the input-token count, a read-back a step).

Attention is ``--attention`` (``auto``: FlexAttention over the packed rows on a GPU). Run on the GPU:
``python benchmarks/run_overhead.py --micro-batches 1,4`` (``--layers`` for a shallower model); on the CPU,
``python benchmarks/run_overhead.py --device cpu --model qwen3-tiny --quant none --attention sdpa`` checks the
script end to end.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import e2e
import torch
from common import LORA
from common import kernel_times
from e2e_run import chat_rows
from e2e_run import model_dir
from transformers import TrainerCallback

VARIANTS = ("bare", "bare-causal", "train", "train-walks", "train-autocast", "train-guard", "train-clip",
            "train-tokens")


class Profiled:
    """With ``enabled``, the steps after the warm-up under the PyTorch profiler: the GPU's busy time a step (the
    kernels' own time) and the kernels that took most of it, to tell GPU work from the GPU waiting on the host."""

    def __init__(self, enabled: bool, warmup: int):
        self.enabled, self.warmup = enabled, warmup
        self.profiler: Any = None
        self.steps = 0

    def step_ended(self) -> None:
        self.steps += 1
        if self.enabled and self.steps == self.warmup:
            from torch.profiler import ProfilerActivity
            from torch.profiler import profile

            self.profiler = profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA])
            self.profiler.__enter__()

    def summary(self) -> dict:
        if self.profiler is None:
            return {}
        self.profiler.__exit__(None, None, None)
        timed = self.steps - self.warmup
        times = kernel_times(self.profiler)
        top = sorted(times, key=lambda name: -times[name][0])[:12]
        return {"gpu_busy_s": round(sum(seconds for seconds, _ in times.values()) / timed, 4),
                "top_kernels": [[name[:80], round(times[name][0] / timed, 4), times[name][1] // timed]
                                for name in top]}


class StepClock(TrainerCallback):
    """``perf_counter`` at the end of every optimizer step, the GPU's work finished."""

    def __init__(self, profiled: Profiled) -> None:
        self.ends: list[float] = []
        self.profiled = profiled

    def on_step_end(self, args, state, control, **kwargs):
        e2e.synchronize()
        self.ends.append(time.perf_counter())
        self.profiled.step_ended()


def step_times(ends: list[float], warmup: int) -> list[float]:
    """The durations of the steps after the first ``warmup`` (the first step's start is not timed)."""
    return [b - a for a, b in zip(ends[warmup - 1:], ends[warmup:], strict=False)]


@contextlib.contextmanager
def replaced(owner: Any, **attributes: Any) -> Iterator[None]:
    """``owner``'s ``attributes`` replaced for the duration, then restored."""
    saved = {name: getattr(owner, name) for name in attributes}
    for name, value in attributes.items():
        setattr(owner, name, value)
    try:
        yield
    finally:
        for name, value in saved.items():
            setattr(owner, name, value)


def unchecked(self, args, state, control, **kwargs):
    """A guard callback that checks nothing."""
    return control


def variant_patches(variant: str, adjust: Callable[[Any], None]) -> contextlib.ExitStack:
    """``adjust(trainer)`` applied to the trainer ``ftengine.train`` makes, and ``variant``'s piece taken away:
    ``train-guard``: the non-finite guard's checks and read-backs; ``train-tokens``: the trainers'
    ``include_num_input_tokens_seen`` (the run's tokens/s then reads 0); ``train-walks``: the module tree cache
    (walked at every step, as the Hugging Face trainer does without ftengine)."""
    from ftengine.engine import module_tree
    from ftengine.engine import training
    from ftengine.engine.guard import NonFiniteGuard
    from ftengine.plugins.trainers import arguments

    made, common = training.light_steps, arguments.common_arguments
    stack = contextlib.ExitStack()
    stack.enter_context(replaced(training, light_steps=lambda trainer: made(adjust(trainer) or trainer)))
    if variant == "train-guard":
        stack.enter_context(replaced(NonFiniteGuard, watch=lambda self, trainer: None,
                                     on_pre_optimizer_step=unchecked, on_optimizer_step=unchecked))
    if variant == "train-tokens":
        stack.enter_context(replaced(arguments, common_arguments=lambda *a, **k: {
            **common(*a, **k), "include_num_input_tokens_seen": "no"}))
    if variant == "train-walks":
        stack.enter_context(replaced(module_tree, walks_cacheable=lambda model, args: False))
    return stack


def unwrap_forward(model: Any) -> None:
    """Drop the autocast wrapper accelerate puts on ``model.forward`` (an instance attribute) when it trains."""
    model.__dict__.pop("forward", None)
    model.__dict__.pop("_original_forward", None)


def train_variant(model: Any, tokenizer: Any, dataset: Any, variant: str, micro_batch: int, total: int,
                  out: Path, profiled: Profiled) -> list[float]:
    """Step ends of one ``ftengine.train`` run with ``variant``'s piece taken away (``train-autocast``: the
    accelerate bf16 autocast wrapper; ``train-clip``: gradient clipping; the rest: :func:`variant_patches`)."""
    import ftengine

    clock = StepClock(profiled)

    def adjust(trainer: Any) -> None:
        trainer.add_callback(clock)
        if variant == "train-autocast":
            trainer.accelerator.native_amp = False

    kwargs = dict(max_steps=total, per_device_train_batch_size=micro_batch, gradient_accumulation_steps=1,
                  learning_rate=1e-4, logging_steps=1, save_steps=10**6, seed=0)
    if variant == "train-clip":
        kwargs["max_grad_norm"] = 0.0
    with variant_patches(variant, adjust):
        ftengine.train(model, tokenizer, dataset, output_dir=str(out / variant / str(micro_batch)), **kwargs)
    unwrap_forward(model)
    return clock.ends


def run_batches(model: Any, tokenizer: Any, dataset: Any, micro_batch: int, total: int) -> list[dict]:
    """The first ``total`` batches the run's trainer would train on, on the model's device."""
    import ftengine

    trainer = ftengine.make_trainer(model, tokenizer, dataset, max_steps=total,
                                    per_device_train_batch_size=micro_batch, output_dir=tempfile.mkdtemp())
    loader = iter(trainer.get_train_dataloader())
    device = next(model.parameters()).device
    return [{k: v.to(device) for k, v in next(loader).items()} for _ in range(total)]


def bare_loop(model: Any, batches: list[dict], causal: bool, profiled: Profiled) -> list[float]:
    """Step ends of forward / backward / AdamW over ``batches`` (``causal``: position ids dropped)."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    model.train()
    ends = []
    for batch in batches:
        inputs = {k: v for k, v in batch.items() if not (causal and k == "position_ids")}
        loss = model(**inputs, use_cache=False).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        float(loss)
        e2e.synchronize()
        ends.append(time.perf_counter())
        profiled.step_ended()
    return ends


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="qwen3-8b")
    parser.add_argument("--quant", choices=("none", "nf4"), default="nf4")
    parser.add_argument("--micro-batches", default="1,4")
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--layers", type=int)
    parser.add_argument("--attention", default="auto")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--model-cache", type=Path, default=Path(tempfile.gettempdir()) / "ftengine-e2e-models")
    parser.add_argument("--out", type=Path, help="JSON lines, one a variant and micro-batch")
    parser.add_argument("--profile", action="store_true", help="profile the timed steps (GPU busy time, top kernels)")
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda",
                        help="cpu: check the script end to end (qwen3-tiny, --attention sdpa, no quantization)")
    args = parser.parse_args()
    unknown = sorted(set(args.variants.split(",")) - set(VARIANTS))
    if unknown:
        parser.error(f"--variants: unknown {', '.join(unknown)}; choose from {', '.join(VARIANTS)}")
    e2e.DEVICE = args.device

    import ftengine

    on_gpu = args.device == "cuda"
    path = model_dir(args.model, args.layers, args.model_cache, e2e.build_model)
    model, tokenizer = ftengine.load_model(str(path), max_seq_length=args.seq,
                                           dtype="bfloat16" if on_gpu else "float32",
                                           load_in_4bit=args.quant == "nf4", attn_implementation=args.attention)
    model = ftengine.add_lora(model, target_modules="all-linear", use_gradient_checkpointing=True, **LORA)
    tokenizer = ftengine.get_chat_template(tokenizer, "chatml")
    total = args.steps + args.warmup
    with tempfile.TemporaryDirectory(prefix="ftengine-run-overhead-") as tmp:
        out = Path(tmp)
        for micro_batch in (int(m) for m in args.micro_batches.split(",")):
            rows = chat_rows(args.seq, total * micro_batch * 6, packed=True)
            dataset = ftengine.load_dataset(rows, tokenizer, max_seq_length=args.seq, packing=True)
            batches = None
            for variant in args.variants.split(","):
                profiled = Profiled(args.profile, args.warmup)
                if variant.startswith("bare"):
                    batches = batches or run_batches(model, tokenizer, dataset, micro_batch, total)
                    ends = bare_loop(model, batches, variant == "bare-causal", profiled)
                else:
                    ends = train_variant(model, tokenizer, dataset, variant, micro_batch, total, out, profiled)
                times = step_times(ends, args.warmup)
                row = dict(model=args.model, quant=args.quant, micro_batch=micro_batch, variant=variant,
                           attention=model.config._attn_implementation, step_s=statistics.median(times),
                           steps=[round(t, 4) for t in times], **profiled.summary())
                print(json.dumps(row), flush=True)
                if args.out:
                    with args.out.open("a") as f:
                        f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    sys.exit(main())
