"""Training callbacks the engine adds to every trainer: progress bar and metrics, checkpoint
completion markers, and a clean stop on Ctrl-C / SIGTERM (a checkpoint is saved first).

With several processes every rank runs them: rank 0 alone writes and prints; tokens/s counts every
rank's tokens (the trainer gathers them) and the line shows each rank's peak memory; a signal
that reaches any rank stops all of them after the same step.
"""

from __future__ import annotations

import signal
import sys
import time
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

from ftengine.engine import distributed
from ftengine.engine.rundir import CHECKPOINT_MARKER
from ftengine.engine.rundir import append_jsonl
from ftengine.engine.rundir import finite_or_none


def _clock(seconds: float) -> str:
    seconds = max(0, int(seconds))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def peak_device_memory_gib() -> float:
    """This process's peak memory: allocated on its GPU, else its peak resident set (CPU)."""
    import torch

    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 2**30


def rank_memory_text(peaks: list[float]) -> str:
    """``1.20 GiB`` for one process, ``1.20/1.21 GiB (ranks 0/1)`` for several."""
    values = "/".join(f"{p:.2f}" for p in peaks)
    return f"{values} GiB" + (f" (ranks {'/'.join(str(r) for r in range(len(peaks)))})" if len(peaks) > 1 else "")


class ProgressCallback(TrainerCallback):
    """A progress line (step, loss, tokens/s, peak memory, ETA) and one ``metrics.jsonl`` record per log;
    evaluations get a line and a record of their own (``eval_loss`` and the other ``eval_*`` metrics)."""

    _RESERVED = ("learning_rate", "grad_norm", "epoch", "num_input_tokens_seen")

    def __init__(self, metrics_path: Path, stream: Any = None, main: bool = True):
        self.main = main
        self.metrics_path = metrics_path
        self.stream = stream or sys.stderr
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.losses: list[tuple[int, float]] = []
        self._start = self._last_time = 0.0
        self._last_tokens = 0
        self._start_step = 0

    def on_train_begin(self, args, state, control, **kwargs):
        self._start = self._last_time = time.perf_counter()
        self._last_tokens = state.num_input_tokens_seen
        self._start_step = state.global_step

    def _evaluation(self, state, logs) -> None:
        """An evaluation's metrics (``eval_loss``, ``eval_*``) as their own ``metrics.jsonl`` record and line."""
        if not self.main:
            return
        record = {"step": state.global_step, **{k: finite_or_none(float(v)) for k, v in logs.items()
                                                 if k.startswith("eval_") and isinstance(v, (int, float))}}
        append_jsonl(self.metrics_path, record)
        shown = " | ".join(f"{k} {v:.4f}" for k, v in record.items() if k != "step" and v is not None
                           and not k.endswith(("_runtime", "_per_second")))
        self.stream.write(("\n" if self.tty else "") + f"step {state.global_step}/{state.max_steps} | {shown}\n")
        self.stream.flush()

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and any(k.startswith("eval_") for k in logs):
            self._evaluation(state, logs)
            return
        if not logs or "loss" not in logs:
            return
        peaks = distributed.gather_objects(round(peak_device_memory_gib(), 3))
        if not self.main:
            return
        now = time.perf_counter()
        tokens = state.num_input_tokens_seen  # every rank's (the trainer gathers them)
        tokens_per_second = (tokens - self._last_tokens) / max(now - self._last_time, 1e-9)
        self._last_time, self._last_tokens = now, tokens
        record = {
            "step": state.global_step,
            "loss": logs["loss"],
            "learning_rate": logs.get("learning_rate", 0.0),
            "tokens_per_second": round(tokens_per_second, 1),
            "grad_norm": logs.get("grad_norm"),
            "epoch": round(float(state.epoch or 0.0), 4),
            "tokens_seen": int(tokens),
            "elapsed_seconds": round(now - self._start, 3),
            "peak_memory_gib": peaks if len(peaks) > 1 else peaks[0],
        }
        # The trainer's own metrics too (DPO's rewards/*, logps/*, ...), under their names.
        record.update({k: v for k, v in logs.items()
                       if k not in record and k not in self._RESERVED and isinstance(v, (int, float))})
        record = {k: finite_or_none(v) for k, v in record.items()}
        if record["loss"] is not None:
            self.losses.append((record["step"], record["loss"]))
        append_jsonl(self.metrics_path, record)
        done = state.global_step - self._start_step
        remaining = max(state.max_steps - state.global_step, 0)
        eta = (now - self._start) / max(done, 1) * remaining
        loss = f"{record['loss']:.4f}" if record["loss"] is not None else "non-finite"
        line = (f"step {state.global_step}/{state.max_steps} | loss {loss} | "
                f"{tokens_per_second:,.0f} tok/s | peak {rank_memory_text(peaks)} | ETA {_clock(eta)}")
        if self.tty:
            width = 24
            filled = int(width * state.global_step / max(state.max_steps, 1))
            self.stream.write(f"\r[{'#' * filled}{'.' * (width - filled)}] {line}   ")
        else:
            self.stream.write(line + "\n")
        self.stream.flush()

    def on_train_end(self, args, state, control, **kwargs):
        if self.tty and self.main:
            self.stream.write("\n")
            self.stream.flush()


class CheckpointMarkerCallback(TrainerCallback):
    """Saves the final step too, and marks a checkpoint complete once the trainer has written all of
    its files (a checkpoint without the marker is never resumed from or exported). With several
    processes rank 0 writes the marker once every rank has written its part, and records the number
    of processes, the strategy and the global batch (what a resume must keep)."""

    def __init__(self, world_size: int = 1, strategy: str = "single"):
        self.world_size = world_size
        self.strategy = strategy

    def on_step_end(self, args, state, control, **kwargs):
        if state.max_steps > 0 and state.global_step >= state.max_steps:
            control.should_save = True
        return control

    def on_save(self, args, state, control, **kwargs):
        distributed.barrier()  # every rank's shard, RNG state and optimizer state written
        checkpoint = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        if state.is_world_process_zero and checkpoint.is_dir():
            distributed.write_checkpoint_info(checkpoint, self.world_size, self.strategy, self.world_size
                                              * args.per_device_train_batch_size * args.gradient_accumulation_steps)
            (checkpoint / CHECKPOINT_MARKER).write_text(f"{state.global_step}\n")


class InterruptCallback(TrainerCallback):
    """On SIGINT or SIGTERM: finish the current step, save a checkpoint and stop. A second
    signal restores the default handlers, so pressing Ctrl-C twice quits at once."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.interrupted = False
        self.signal_name = ""
        self._previous: dict[int, Any] = {}

    def _handle(self, signum, frame):
        self.interrupted = True
        self.signal_name = signal.Signals(signum).name
        self.restore()
        sys.stderr.write(f"\n{self.signal_name}: saving a checkpoint after this step, then stopping "
                         f"(send it again to quit at once)\n")

    def install(self) -> None:
        for sig in self.SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _stop_if_interrupted(self, control):
        # every rank asks the others, so all stop after the same step (a collective: called at the same points)
        if distributed.any_rank(self.interrupted):
            self.interrupted = True
            control.should_save = True
            control.should_training_stop = True
        return control

    def on_step_end(self, args, state, control, **kwargs):
        return self._stop_if_interrupted(control)

    def on_log(self, args, state, control, logs=None, **kwargs):
        # The trainer decides whether to save right after logging a step: a signal that arrived
        # during that step's logging still stops at that step.
        return self._stop_if_interrupted(control)
