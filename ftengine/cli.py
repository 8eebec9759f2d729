"""The ``ftengine`` command line. Heavy imports live inside the commands so ``--help`` is instant."""

from __future__ import annotations

import json
import logging
import os
import sys
import warnings
from pathlib import Path
from typing import Any

import click

from ftengine.core.errors import FtengineError

CORE_COMMANDS = ("run", "init", "plugins", "export", "config-schema", "data", "chat", "generate")
EXIT_ERROR, EXIT_INTERRUPTED = 1, 130


class FtengineGroup(click.Group):
    """Adds plugin-registered commands lazily; they cannot shadow a core command."""

    def _plugin_commands(self) -> dict[str, click.Command]:
        from ftengine.core.plugins import get_registry

        return {name: cmd for name, cmd in get_registry("commands").items() if name not in self.commands}

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted([*self.commands, *self._plugin_commands()])

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        return self.commands.get(name) or self._plugin_commands().get(name)


def quiet_libraries() -> None:
    """Keep the terminal for ftengine's own progress and summary."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # bitsandbytes warns on import, on CPUs with AVX512-BF16, that an optional hub kernel is absent.
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning, module="torch")
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    import datasets

    datasets.utils.logging.set_verbosity_error()
    datasets.disable_progress_bars()


def setup_logging(debug: bool) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("ftengine: %(message)s"))
    logger = logging.getLogger("ftengine")
    logger.handlers[:] = [handler]
    logger.setLevel(logging.DEBUG if debug else logging.INFO)
    logger.propagate = False


def fail(exc: BaseException, debug: bool) -> None:
    """One line on stderr (the traceback only with ``--debug``) and exit 1. A rank of several names itself;
    under ``--gpus`` it leaves the line to the launcher, which reports the first failing rank's."""
    from ftengine.engine import distributed

    distributed.record_error(exc)
    if debug:
        raise exc
    if not os.environ.get(distributed.ENV_LAUNCHED):
        if isinstance(exc, (FtengineError, FileExistsError)):
            click.echo(f"error: {distributed.error_line(exc)}", err=True)
        else:
            from ftengine.engine.failures import error_line

            click.echo(f"error: {error_line(exc)} (run with --debug for the traceback)", err=True)
    sys.exit(EXIT_ERROR)


def interrupted_twice(exc: KeyboardInterrupt) -> None:
    """A second Ctrl-C stops at once: say where the last complete checkpoint is, exit 130."""
    checkpoint, run_dir = getattr(exc, "checkpoint", None), getattr(exc, "run_dir", None)
    if checkpoint is not None:
        where = f"; last complete checkpoint: {checkpoint}; resume with: ftengine run --resume {run_dir}"
    else:
        where = "; no checkpoint was complete" if run_dir is not None else ""
    click.echo(f"\nstopped at once by a second interrupt{where}", err=True)
    sys.exit(EXIT_INTERRUPTED)


@click.group(cls=FtengineGroup)
@click.version_option(package_name="ftengine")
def main() -> None:
    """ftengine: fine-tune open LLMs and vision-language models with LoRA, QLoRA or in full; SFT, DPO, ORPO,
    KTO and GRPO; one GPU or several; fast kernels; exports for transformers, vLLM, llama.cpp and Ollama."""


def _gib(value: float) -> str:
    return f"{value:.2f} GiB"


def print_summary(result: Any) -> None:
    t, d = result.train, result.data
    rows = [("run directory", str(result.run_dir.path)), ("steps", str(t.steps))]
    if t.first_loss is not None:
        rows.append(("loss", f"{t.first_loss:.4f} -> {t.last_loss:.4f} (first -> last logged)"))
    if t.rewards.get("reward"):
        parts = [f"{name} {values[0][1]:.2f} -> {values[-1][1]:.2f}" for name, values in t.rewards.items()
                 if name != "reward"]
        total = t.rewards["reward"]
        rows.append(("reward", f"{total[0][1]:.2f} -> {total[-1][1]:.2f} (first -> last logged mean"
                               + (f"; {', '.join(parts)})" if parts else ")")))
    if t.eval_losses:
        rows.append(("eval loss", f"{t.eval_losses[0][1]:.4f} -> {t.eval_losses[-1][1]:.4f} "
                                  f"({len(t.eval_losses)} evaluations)"))
    rows.append(("wall time", f"{t.wall_seconds:.1f} s training"))
    mem = result.memory
    memory = f"CPU RSS {_gib(mem['cpu_rss_gib'])}"
    if "gpu_allocated_gib" in mem:
        memory += f", GPU {_gib(mem['gpu_allocated_gib'])} allocated / {_gib(mem['gpu_reserved_gib'])} reserved"
    for rank, peak in enumerate(mem.get("ranks", [])):
        gpu = f", GPU {_gib(peak['gpu_allocated_gib'])} allocated" if "gpu_allocated_gib" in peak else ""
        memory += f"; rank {rank}: CPU RSS {_gib(peak['cpu_rss_gib'])}{gpu}"
    rows.append(("peak memory", memory))
    trained = d.trained_tokens / max(d.tokens, 1)
    rows.append(("data", f"{d.samples} samples from {d.rows} rows ({d.format}); {d.skipped} skipped, "
                          f"{d.truncated} truncated; {trained:.0%} of tokens trained"))
    for reason in d.skip_reasons[:3]:
        rows.append(("  skipped", reason))
    if d.eval:
        line = f"{d.eval.get('samples', 0)} samples"
        if d.eval.get("skipped"):
            line += f"; {d.eval['skipped']} skipped (first: {d.eval['skip_reasons'][0]})"
        rows.append(("eval data", line))
    rows += [("setup", note) for note in result.notes]
    outputs = ["config.yaml", "metrics.jsonl", "loss.png", "checkpoints/"]
    rows.append(("outputs", ", ".join(outputs)))
    for name, (path, lines) in result.exports.items():
        rows.append((f"export {name}", f"{path}: " + "; ".join(lines)))
    width = max(len(k) for k, _ in rows)
    click.echo("\n".join(f"  {k.ljust(width)}  {v}" for k, v in rows))


@main.command()
@click.argument("config", required=False, type=click.Path(dir_okay=False))
@click.option("--output-dir", type=click.Path(file_okay=False), help="Parent directory of the run directory.")
@click.option("--resume", "resume_dir", type=click.Path(file_okay=False), help="Continue RUN_DIR from its latest "
                                                                              "checkpoint.")
@click.option("--demo", "demo_kind", type=click.Choice(["sft", "dpo", "grpo", "vision"]), default=None,
              help="Run the built-in demo: sft (the default without CONFIG), dpo, grpo, or vision (formula images).")
@click.option("--gpus", type=click.IntRange(min=1), default=None,
              help="Train on N GPUs of this machine (DDP or FSDP2, see distributed.strategy): ftengine launches "
                   "the N processes through torchrun itself.")
@click.option("--debug", is_flag=True, help="Show full tracebacks.")
def run(config: str | None, output_dir: str | None, resume_dir: str | None, demo_kind: str | None,
        gpus: int | None, debug: bool) -> None:
    """Train as CONFIG says (a YAML run config), or the built-in demo when no CONFIG is given (--demo dpo, grpo or
    vision: the DPO, GRPO or formula-image demo). Under torchrun or accelerate launch every process runs it,
    data-parallel."""
    setup_logging(debug)
    quiet_libraries()
    from ftengine.core.config import load_config
    from ftengine.engine import distributed
    from ftengine.engine import pipeline
    from ftengine.engine.rundir import RunDir

    if demo_kind and (config or resume_dir):
        fail(FtengineError("--demo runs the built-in demo: give it without CONFIG or --resume"), debug)
    demo = config is None and resume_dir is None
    rank = distributed.rank_info()
    try:
        run_dir = None
        if resume_dir:
            run_dir = RunDir(Path(resume_dir))
            if not run_dir.config_path.exists():
                raise FtengineError(f"{resume_dir}: not a run directory (no config.yaml)")
            cfg = load_config(run_dir.config_path)
            if rank.is_main:
                click.echo(f"resuming {run_dir.path}", err=True)
        elif demo:
            from ftengine.demo import demo_config

            kind = demo_kind or "sft"
            what = {"dpo": "DPO with LoRA", "grpo": "GRPO with LoRA (toy arithmetic)",
                    "vision": "LoRA on formula images"}.get(kind, "LoRA")
            arch = "Qwen2.5-VL" if kind == "vision" else "Qwen2"
            start = ("random initial weights, warmed up by a few seconds of SFT on other sums" if kind == "grpo"
                     else "random initial weights")
            click.echo(f"ftengine demo: {what} on a tiny {arch}-architecture model ({start}), on the CPU", err=True)
            cfg = demo_config(kind)
        else:
            cfg = load_config(config)
        if not rank.distributed and (gpus or cfg.distributed.num_processes > 1):
            from ftengine.engine.launch import LaunchInterrupted
            from ftengine.engine.launch import launch_run

            try:
                run_dir = launch_run(cfg, gpus, run_dir, output_dir, debug)
            except LaunchInterrupted as exc:
                click.echo(f"interrupted: {exc}", err=True)
                sys.exit(EXIT_INTERRUPTED)
            if demo:
                _demo_answer(run_dir.exports, demo_kind)
            return
        if gpus:
            raise FtengineError(f"--gpus {gpus}: this process is already one of {rank.world_size} launched by "
                                "torchrun / accelerate launch; leave --gpus out")
        if os.environ.get(distributed.ENV_RUN_DIR) and not resume_dir:
            run_dir = RunDir(Path(os.environ[distributed.ENV_RUN_DIR]))
        result = pipeline.run(cfg, run_dir=run_dir, output_dir=output_dir, resume=resume_dir is not None)
    except KeyboardInterrupt as exc:
        interrupted_twice(exc)
        return
    except Exception as exc:  # noqa: BLE001 - every failure is one line; --debug shows the traceback
        fail(exc, debug)
        return
    finally:
        distributed.shutdown()
    if not rank.is_main:
        sys.exit(EXIT_INTERRUPTED if result.train.interrupted else 0)
    print_summary(result)
    if result.failed_exports:
        for name, error in result.failed_exports.items():
            click.echo(f"export {name} failed: {error}\n  redo it with: ftengine export {result.run_dir.path} "
                       f"--format {name}   (or: ftengine run --resume {result.run_dir.path})", err=True)
        click.echo("training completed; the exports above did not", err=True)
        sys.exit(EXIT_ERROR)
    if result.train.interrupted:
        click.echo(f"interrupted at step {result.train.steps}; checkpoint: {result.train.checkpoint}\n"
                   f"resume with: ftengine run --resume {result.run_dir.path}", err=True)
        sys.exit(EXIT_INTERRUPTED)
    if demo:
        _demo_answer(result.run_dir.exports, demo_kind)


def _demo_answer(exports: Path, kind: str | None) -> None:
    """What the demo's exported model now does: the GRPO prompts answered, the formula read, the question asked."""
    if kind == "grpo":
        if (exports / "lora").is_dir():
            from ftengine.demo import grpo_report

            click.echo(grpo_report(exports / "lora"))
        return
    if not (exports / "merged").is_dir():
        return
    if kind == "vision":
        from ftengine.demo.vision import compare_readings

        click.echo(compare_readings(exports / "merged"))
        return
    from ftengine.demo import PROMPT
    from ftengine.demo import ask

    answer = ask(exports / "merged")
    click.echo(f"\nthe merged model, reloaded with transformers:\n  Q: {PROMPT}\n  A: {answer}")


@main.command()
@click.argument("path", type=click.Path(dir_okay=False))
@click.option("--force", is_flag=True, help="Overwrite an existing file.")
def init(path: str, force: bool) -> None:
    """Write a commented starter config to PATH."""
    target = Path(path)
    if target.exists() and not force:
        fail(FtengineError(f"{target} already exists (pass --force to overwrite it)"), False)
    from ftengine.engine.rundir import atomic_write_text

    atomic_write_text(target, (Path(__file__).parent / "starter.yaml").read_text())
    click.echo(f"wrote {target}: fill in model.name_or_path and data.path, then: ftengine run {target}")


@main.command()
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def plugins(as_json: bool) -> None:
    """List the installed plugins, what each registered, and the broken ones with their error."""
    from ftengine.core.kernels import op_table
    from ftengine.core.plugins import registries

    infos = list(registries().plugins.values())
    if as_json:
        click.echo(json.dumps([{**i.__dict__, "ok": i.ok} for i in infos], indent=2))
        return
    for info in infos:
        status = "ok" if info.ok else "BROKEN"
        click.echo(f"{info.name}  ({info.distribution} {info.version})  [{status}]")
        for kind, names in sorted(info.registered.items()):
            click.echo(f"    {kind}: {', '.join(names)}")
        if info.error:
            click.echo(f"    error: {info.error}")
    click.echo("kernel ops: " + ", ".join(f"{op} -> {backend}" for op, backend in op_table().items()))


@main.command("config-schema")
def config_schema_cmd() -> None:
    """Print the run config's JSON schema (every key, its type, default and description)."""
    from ftengine.core.config import config_schema

    click.echo(json.dumps(config_schema(), indent=2))


@main.command()
@click.argument("source", type=click.Path(exists=True, file_okay=False))
@click.option("--format", "formats", multiple=True, required=True, help="Exporter name (lora, merged, gguf...); "
                                                                      "repeat for several.")
@click.option("--quant", "--quantization", "quantization",
              help="GGUF quantization (q8_0, q4_k_m, ...; comma-separated for several).")
@click.option("--imatrix", is_flag=False, flag_value=True, default=None, type=click.UNPROCESSED, metavar="[PATH]",
              help="GGUF importance matrix: alone, collected on the run's training data (or --calibration-data); "
                   "with a path, read from a llama.cpp imatrix file (.gguf or .dat).")
@click.option("--calibration-data", type=click.Path(dir_okay=False),
              help="Calibration text for --imatrix (.txt, or .json/.jsonl whose strings are used).")
@click.option("--output", type=click.Path(file_okay=False), help="Output directory (default: SOURCE/exports).")
@click.option("--overwrite", is_flag=True, help="Replace existing outputs.")
@click.option("--debug", is_flag=True, help="Show full tracebacks.")
def export(source: str, formats: tuple[str, ...], quantization: str | None, imatrix: bool | str | None,
           calibration_data: str | None, output: str | None, overwrite: bool, debug: bool) -> None:
    """Export a finished run directory or one of its checkpoints."""
    setup_logging(debug)
    quiet_libraries()
    from ftengine.engine.export_source import export_run

    try:
        results = export_run(Path(source), formats, quantization, Path(output) if output else None, overwrite,
                             imatrix, calibration_data)
    except Exception as exc:  # noqa: BLE001 - every failure is one line; --debug shows the traceback
        fail(exc, debug)
        return
    for name, (path, lines) in results.items():
        click.echo(f"{name}: {path}: " + "; ".join(lines))


def sampling_options(command: Any) -> Any:
    """The sampling flags ``chat`` and ``generate`` share."""
    for option in reversed([
        click.option("--temperature", type=click.FloatRange(min=0), default=0.7, show_default=True,
                     help="0 decodes greedily."),
        click.option("--top-p", type=click.FloatRange(0, 1), default=1.0, show_default=True),
        click.option("--min-p", type=click.FloatRange(0, 1), default=0.0, show_default=True),
        click.option("--max-new-tokens", type=click.IntRange(min=1), default=256, show_default=True),
        click.option("--system", help="System message put first in every conversation."),
        click.option("--debug", is_flag=True, help="Show full tracebacks."),
    ]):
        command = option(command)
    return command


@main.command()
@click.argument("source", type=click.Path(exists=True))
@sampling_options
def chat(source: str, temperature: float, top_p: float, min_p: float, max_new_tokens: int, system: str | None,
         debug: bool) -> None:
    """Talk to SOURCE (a run directory or checkpoint, a model or LoRA directory, or a .gguf file) with its chat
    template, the answer streamed. /image PATH attaches an image to the next message (vision-language models),
    /reset starts over, /exit (or end of input) quits."""
    setup_logging(debug)
    quiet_libraries()
    from ftengine.engine.generation import Sampling
    from ftengine.engine.generation import as_conversation
    from ftengine.engine.generation import image_problem
    from ftengine.engine.generation import open_chat
    from ftengine.engine.generation import user_message

    try:
        backend = open_chat(source)
    except FtengineError as exc:
        fail(exc, debug)
        return
    sampling = Sampling(max_new_tokens, temperature, top_p, min_p)
    attach = "/image PATH attaches an image to your next message, " if backend.takes_images else ""
    click.echo(f"chatting with {backend.description}; {attach}/reset starts over, /exit quits", err=True)
    history: list[dict[str, Any]] = []
    images: list[str] = []
    stdin = click.get_text_stream("stdin")
    while True:
        click.echo("> ", nl=False, err=True)
        line = stdin.readline()
        if not line or line.strip() == "/exit":
            break
        text = line.strip()
        if text == "/reset":
            history, images = [], []
            click.echo("(conversation reset)", err=True)
            continue
        if not text:
            continue
        if text.split(maxsplit=1)[0] == "/image":
            path = text[len("/image"):].strip()
            problem = image_problem(backend, path, len(images)) if path else "usage: /image PATH"
            if problem is None:
                images.append(path)
            click.echo(f"({problem or f'{path} goes with your next message'})", err=True)
            continue
        history.append(user_message(text, images))
        images = []
        pieces = []
        for piece in backend.stream(as_conversation(history, system), sampling):
            pieces.append(piece)
            click.echo(piece, nl=False)
        click.echo()
        history.append({"role": "assistant", "content": "".join(pieces).strip()})


@main.command()
@click.argument("source", type=click.Path(exists=True))
@click.option("--input", "input_path", required=True, type=click.Path(exists=True, dir_okay=False),
              help='JSONL of {"prompt": ...} or {"messages": [...]} rows (a vision-language model\'s may hold '
                   '{"type": "image", "image": path} parts, paths relative to the file).')
@click.option("--output", "output_path", required=True, type=click.Path(dir_okay=False),
              help="JSONL written: each input row with its \"completion\".")
@click.option("--batch-size", type=click.IntRange(min=1), default=8, show_default=True)
@sampling_options
def generate(source: str, input_path: str, output_path: str, batch_size: int, temperature: float, top_p: float,
             min_p: float, max_new_tokens: int, system: str | None, debug: bool) -> None:
    """Complete every prompt of --input with SOURCE (as for chat), in left-padded batches, into --output."""
    setup_logging(debug)
    quiet_libraries()
    from ftengine.engine.generation import Sampling
    from ftengine.engine.generation import as_conversation
    from ftengine.engine.generation import check_images_taken
    from ftengine.engine.generation import open_chat
    from ftengine.engine.generation import read_prompts
    from ftengine.engine.rundir import atomic_write_text

    try:
        rows = read_prompts(Path(input_path))
        backend = open_chat(source)
        check_images_taken(rows, Path(input_path), backend)
    except FtengineError as exc:
        fail(exc, debug)
        return
    sampling = Sampling(max_new_tokens, temperature, top_p, min_p)
    lines = []
    for start in range(0, len(rows), batch_size):
        chunk = rows[start:start + batch_size]
        answers = backend.batch([as_conversation(p.messages, system) for p in chunk], sampling)
        lines += [json.dumps({**p.row, "completion": answer}) for p, answer in zip(chunk, answers, strict=True)]
        click.echo(f"{min(start + batch_size, len(rows))}/{len(rows)} prompts", err=True)
    atomic_write_text(Path(output_path), "".join(line + "\n" for line in lines))
    click.echo(f"wrote {len(lines)} completions to {output_path}")


@main.group()
def data() -> None:
    """Inspect a run's data before training."""


@data.command()
@click.argument("config", type=click.Path(dir_okay=False))
@click.option("-n", "count", type=click.IntRange(min=0), default=3, show_default=True,
              help="How many samples to print.")
@click.option("--debug", is_flag=True, help="Show full tracebacks.")
def preview(config: str, count: int, debug: bool) -> None:
    """Print the first samples of CONFIG's data as the trainer sees them (trained tokens highlighted: in
    colour on a terminal unless NO_COLOR is set, in [[brackets]] otherwise), then statistics over the whole
    dataset. Loads the tokenizer only, never the model's weights."""
    setup_logging(debug)
    quiet_libraries()
    from ftengine.core.config import load_config
    from ftengine.engine import preview as previewing

    try:
        cfg = load_config(config)
        if not cfg.data.path:
            raise FtengineError(f"{config}: data.path is not set")
        tokenizer, template = previewing.load_tokenizer(cfg)
        result = previewing.build_preview(cfg, tokenizer, count, template)
    except Exception as exc:  # noqa: BLE001 - every failure is one line; --debug shows the traceback
        fail(exc, debug)
        return
    color = click.get_text_stream("stdout").isatty() and not os.environ.get("NO_COLOR")
    for i, shown in enumerate(result.shown, start=1):
        click.echo(previewing.format_sample(i, shown, cfg.model.max_seq_length, color, result.marker), color=color)
        click.echo()
    click.echo("\n".join(previewing.format_statistics(result, cfg.data.path)))
