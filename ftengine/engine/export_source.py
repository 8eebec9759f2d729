"""Loading a finished run or one of its checkpoints back for ``ftengine export``."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ftengine.core import plugins
from ftengine.core.config import ExportEntry
from ftengine.core.config import RunConfig
from ftengine.core.config import load_config
from ftengine.core.config import validate_exports
from ftengine.core.errors import FtengineError
from ftengine.engine import loftq
from ftengine.engine import pipeline
from ftengine.engine.data import DataReport
from ftengine.engine.exporting import export_all
from ftengine.engine.run_data import prepare_dataset
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


class TrainingRows(Sequence):
    """The run's training rows, tokenized as the run tokenized them, read from ``data.path`` only when an
    exporter first asks (the default calibration text of ``imatrix: true``)."""

    def __init__(self, config: RunConfig, tokenizer: Any) -> None:
        self._config, self._tokenizer = config, tokenizer
        self._rows: list[Any] | None = None

    def _load(self) -> list[Any]:
        if self._rows is None:
            trainer = plugins.get("trainers", self._config.training.trainer)
            self._rows = prepare_dataset(self._config.data.path, self._tokenizer, self._config.data,
                                         self._config.model.max_seq_length, trainer.sample_kinds, DataReport())
        return self._rows

    def __len__(self) -> int:
        return len(self._load())

    def __getitem__(self, index: Any) -> Any:
        return self._load()[index]


def gguf_options(quantization: str | None, imatrix: bool | str | None = None,
                 calibration_data: str | None = None) -> dict[str, Any]:
    """The ``gguf`` entry options of ``ftengine export``'s flags: ``--quant`` (comma-separated for several),
    ``--imatrix`` (``True``: computed; a path: read) and ``--calibration-data`` (implies a computed imatrix)."""
    options: dict[str, Any] = {}
    if quantization:
        names = [q.strip() for q in quantization.split(",")]
        options["quantization"] = names if len(names) > 1 else names[0]
    if calibration_data is not None:
        if isinstance(imatrix, str):
            raise FtengineError(f"--calibration-data computes an importance matrix; --imatrix {imatrix} reads one: "
                                f"pass one of them")
        options.update(imatrix=True, imatrix_data=calibration_data)
    elif imatrix is not None:
        options["imatrix"] = imatrix
    return options


def load_for_export(source: Path, formats: tuple[str, ...], quantization: str | None,
                    imatrix: bool | str | None = None, calibration_data: str | None = None
                    ) -> tuple[Any, Any, list[ExportEntry], Path]:
    """The trained model and tokenizer of ``source``, the export entries, and the default output."""
    run_dir, checkpoint, default_out = locate(source)
    config = load_config(run_dir.config_path)
    options = gguf_options(quantization, imatrix, calibration_data)
    if (imatrix is not None or calibration_data is not None) and "gguf" not in formats:
        raise FtengineError("--imatrix and --calibration-data are options of the gguf export: add --format gguf")
    entries = validate_exports([{"format": name, **(options if name == "gguf" else {})} for name in formats],
                               source="export options", base=config)
    model, tokenizer = load_checkpoint(config, checkpoint)
    return model, tokenizer, entries, default_out


def export_run(source: Path, formats: tuple[str, ...], quantization: str | None, output: Path | None = None,
               overwrite: bool = False, imatrix: bool | str | None = None, calibration_data: str | None = None
               ) -> dict[str, tuple[Path, list[str]]]:
    """``ftengine export``: the run's checkpoint exported while holding the run directory's lock
    (no training or other export writes into it meanwhile). ``imatrix=True`` without ``calibration_data``
    collects the importance matrix on the run's own training rows."""
    run_dir, _, _ = locate(source)
    with run_dir.lock("export"):
        model, tokenizer, entries, default_out = load_for_export(source, formats, quantization, imatrix,
                                                                 calibration_data)
        out = output or default_out
        remove_leftovers(out)
        rows = TrainingRows(load_config(run_dir.config_path), tokenizer)
        return export_all(model, tokenizer, entries, out, overwrite=overwrite, calibration=rows)[0]
