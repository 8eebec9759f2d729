"""``ftengine run --gpus N`` (or ``distributed.num_processes: N``): the run launched on N local processes.

This process checks everything it can before a process starts (the config, the model and data
paths, the GPUs, the strategy), creates the run directory and writes the resolved config into it,
then runs N copies of ``ftengine run <run dir>/config.yaml`` through ``torch.distributed``'s
elastic launcher, the one ``torchrun`` runs, with the run directory fixed in their environment.
A rank's error comes back here and is shown as one line naming the rank.
"""

from __future__ import annotations

import os
import signal
import sys
import uuid
from typing import Any

from ftengine.core.errors import FtengineError
from ftengine.engine import distributed
from ftengine.engine.rundir import RunDir

SHUTDOWN_GRACE_SECONDS = 120
"""How long the launcher waits for its ranks to save a checkpoint after Ctrl-C / SIGTERM."""
EXIT_INTERRUPTED = 130


class LaunchFailed(FtengineError):
    """A rank failed: the message names it and carries its error."""


class LaunchInterrupted(FtengineError):
    """The launcher was stopped by a signal; the ranks saved a checkpoint and stopped."""


def check_gpus(requested: int) -> None:
    """Raises:
    FtengineError: more GPUs asked for than are visible."""
    visible = distributed.visible_gpus()
    if requested > visible:
        where = os.environ.get("CUDA_VISIBLE_DEVICES")
        shown = f" (CUDA_VISIBLE_DEVICES={where})" if where is not None else ""
        raise FtengineError(f"--gpus {requested}: only {visible} CUDA GPU(s) visible{shown}")


AFTERMATH = ("Connection closed by peer", "Connection reset by peer", "remote worker crashing",
             "communicator was aborted", "Broken pipe")
"""What a rank's collective says when another rank died: an echo of the failure, not its cause."""


def first_failure(failures: dict[int, Any]) -> str:
    """``rank N: <its error>`` for the rank that failed first, from the elastic launcher's failures
    (a rank that recorded its own error wins over ranks whose collectives lost a peer, which win over
    ranks that were only stopped)."""

    def message(failure: Any) -> str:
        text = failure.message
        if isinstance(text, dict):
            text = text.get("message", "")
        return "" if not text or str(text).startswith("To enable traceback") else str(text)

    recorded = {r: f for r, f in failures.items() if message(f)}
    causes = {r: f for r, f in recorded.items() if not any(echo in message(f) for echo in AFTERMATH)}
    rank, failure = min((causes or recorded or failures).items(), key=lambda item: (item[1].timestamp, item[0]))
    text = message(failure)
    if not text:
        text = f"stopped by {failure.signal_name()}" if failure.exitcode < 0 else f"exit code {failure.exitcode}"
    return f"rank {rank}: {text}"


def launch(num_processes: int, args: list[str], env: dict[str, str]) -> None:
    """Run ``python -m ftengine <args>`` on ``num_processes`` local processes; return when all succeeded.

    Ctrl-C or SIGTERM to this process reaches every rank once; they save a checkpoint after the
    current step and stop (within :data:`SHUTDOWN_GRACE_SECONDS`). When a rank fails the launcher
    stops the others at once.

    Raises:
        LaunchFailed: a rank failed (the message names the first and carries its error).
        LaunchInterrupted: the launcher got a signal, or every rank stopped on one.
    """
    import logging

    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig
    from torch.distributed.launcher.api import elastic_launch

    distributed.check_backend()
    for name in ("torch.distributed.elastic", "torch.distributed.launcher"):
        logging.getLogger(name).setLevel(logging.CRITICAL)
    config = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=num_processes, run_id=uuid.uuid4().hex,
                          rdzv_backend="c10d", rdzv_endpoint="localhost:0", max_restarts=0, monitor_interval=0.2,
                          start_method="spawn", shutdown_timeout=SHUTDOWN_GRACE_SECONDS)
    saved = {k: os.environ.get(k) for k in [*env, distributed.ENV_LAUNCHED]}
    os.environ.update(env)
    os.environ[distributed.ENV_LAUNCHED] = "1"
    try:
        elastic_launch(config, sys.executable)("-m", "ftengine", *args)
    except ChildFailedError as exc:
        if all(f.exitcode == EXIT_INTERRUPTED for f in exc.failures.values()):
            raise LaunchInterrupted("every rank saved a checkpoint and stopped") from None
        raise LaunchFailed(first_failure(exc.failures)) from None
    except SignalException as exc:
        raise LaunchInterrupted(f"{signal.Signals(exc.sigval).name}: the ranks saved a checkpoint and "
                                "stopped") from None
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def launch_run(config: Any, gpus: int | None, run_dir: RunDir | None, output_dir: str | None,
               debug: bool = False) -> RunDir:
    """Check, create the run directory (unless resuming ``run_dir``), launch, and return the run directory.

    Raises:
        FtengineError: bad input (before any process starts), or a rank's error (:class:`LaunchFailed`).
        LaunchInterrupted: stopped by Ctrl-C / SIGTERM after the ranks saved a checkpoint.
    """
    from ftengine.core.config import dump_config
    from ftengine.engine import pipeline

    distributed.check_backend()
    processes = gpus or config.distributed.num_processes
    if gpus or distributed.visible_gpus():
        check_gpus(processes)
    config = config.model_copy(update={"distributed": config.distributed.model_copy(
        update={"num_processes": processes})})
    pipeline.preflight(config)
    hf_config = pipeline.load_model_config(config.model.name_or_path, config.model.trust_remote_code,
                                           config.model.revision)
    strategy, _ = distributed.choose_strategy(config, hf_config, processes)
    args = ["run", *(["--debug"] if debug else [])]
    env = {}
    if run_dir is not None:
        checkpoint = run_dir.latest_checkpoint()
        if checkpoint is None:
            raise FtengineError(f"{run_dir.path}: no complete checkpoint to resume from")
        distributed.resume_config(config, checkpoint, processes, strategy)
        run_dir.write_text(run_dir.config_path.name, dump_config(config))
        args += ["--resume", str(run_dir.path)]
    else:
        run_dir = pipeline.new_run_dir(config, output_dir)
        run_dir.write_text(run_dir.config_path.name, dump_config(config))
        args.append(str(run_dir.config_path))
        env[distributed.ENV_RUN_DIR] = str(run_dir.path)
    sys.stderr.write(f"ftengine: launching {processes} processes ({run_dir.path})\n")
    try:
        launch(processes, args, env)
    except LaunchInterrupted as exc:
        raise LaunchInterrupted(f"{exc}; resume with: ftengine run --resume {run_dir.path}") from None
    except LaunchFailed as exc:
        run_dir.set_status("failed", error=str(exc))  # the first failure, not another rank's consequence of it
        raise
    return run_dir
