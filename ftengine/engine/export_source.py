"""Loading a finished run or one of its checkpoints back for ``ftengine export``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ftengine.core.config import ExportEntry
from ftengine.core.config import RunConfig
from ftengine.core.config import load_config
from ftengine.core.config import validate_exports
from ftengine.core.errors import FtengineError
from ftengine.engine import loftq
from ftengine.engine import pipeline
from ftengine.engine.exporting import export_all
from ftengine.engine.rundir import CHECKPOINT_MARKER
from ftengine.engine.rundir import RunDir
from ftengine.engine.rundir import remove_leftovers


def locate(source: Path) -> tuple[RunDir, Path, Path]:
    """``(run_dir, checkpoint, default_output)`` for a run directory or a checkpoint directory."""
    if (source / "config.yaml").exists():
        run_dir = RunDir(source)
        checkpoint = run_dir.latest_checkpoint()
        if checkpoint is None:
            raise FtengineError(f"{source}: the run has no complete checkpoint to export")
        return run_dir, checkpoint, run_dir.exports
    if source.name.startswith("checkpoint-") and (source.parent.parent / "config.yaml").exists():
        if not (source / CHECKPOINT_MARKER).exists():
            raise FtengineError(f"{source}: an incomplete checkpoint (its writing was interrupted)")
        run_dir = RunDir(source.parent.parent)
        return run_dir, source, run_dir.path / f"exports-{source.name}"
    raise FtengineError(f"{source}: neither a run directory (with config.yaml) nor one of its checkpoints")


def load_checkpoint(config: RunConfig, checkpoint: Path) -> tuple[Any, Any]:
    """The model of a run's checkpoint (the base with its adapter, or the whole fine-tuned model) and
    its tokenizer (a vision-language model's processor holding it: the mmproj export reads the image
    processor), in eval mode."""
    from transformers import AutoTokenizer

    config = config.model_copy(deep=True)
    if config.model.full_finetuning:  # the checkpoint holds the whole model
        config.model.name_or_path = str(checkpoint)
    loaded = pipeline.load(config)
    model = loaded.model
    if not config.model.full_finetuning:
        model = loftq.load_adapter(model, checkpoint)
    tokenizer = AutoTokenizer.from_pretrained(str(checkpoint))
    model.eval()
    if loaded.processor is not None:
        loaded.processor.tokenizer = tokenizer
        return model, loaded.processor
    return model, tokenizer


def load_for_export(source: Path, formats: tuple[str, ...], quantization: str | None
                    ) -> tuple[Any, Any, list[ExportEntry], Path]:
    """The trained model and tokenizer of ``source``, the export entries, and the default output."""
    run_dir, checkpoint, default_out = locate(source)
    config = load_config(run_dir.config_path)
    several = quantization is not None and "," in quantization
    choice = [q.strip() for q in quantization.split(",")] if several else quantization
    gguf_options = {"quantization": choice} if quantization else {}
    entries = validate_exports([{"format": name, **(gguf_options if name == "gguf" else {})} for name in formats],
                               source="export options", base=config)
    model, tokenizer = load_checkpoint(config, checkpoint)
    return model, tokenizer, entries, default_out


def export_run(source: Path, formats: tuple[str, ...], quantization: str | None, output: Path | None = None,
               overwrite: bool = False) -> dict[str, tuple[Path, list[str]]]:
    """``ftengine export``: the run's checkpoint exported while holding the run directory's lock
    (no training or other export writes into it meanwhile)."""
    run_dir, _, _ = locate(source)
    with run_dir.lock("export"):
        model, tokenizer, entries, default_out = load_for_export(source, formats, quantization)
        out = output or default_out
        remove_leftovers(out)
        return export_all(model, tokenizer, entries, out, overwrite=overwrite)[0]
