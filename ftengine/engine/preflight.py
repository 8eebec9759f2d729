"""One check of a run before the model loads, reporting every problem at once.

Nothing here reads weights: the architecture is built on the meta device from the model's
``config.json`` to check LoRA targets against its module names. No run directory exists until
:func:`check` passes.
"""

from __future__ import annotations

import codecs
import json
import logging
import os
import re
from pathlib import Path
from typing import Any

import torch

from ftengine.core import plugins
from ftengine.core.config import RunConfig
from ftengine.core.config import export_options
from ftengine.core.errors import ConfigError
from ftengine.core.errors import FtengineError

log = logging.getLogger("ftengine")

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "vocab.json", "spiece.model")
SAFE_WEIGHTS = (".safetensors",)
PICKLE_WEIGHTS = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
TEXT_SUFFIXES = (".jsonl", ".json", ".csv")


def check(config: RunConfig) -> list[str]:
    """Every problem of ``config`` that shows before loading the model, raised together.

    Returns:
        Warnings (settings that work but are likely mistakes), also logged.

    Raises:
        ConfigError: one line per problem, each naming its key or file.
    """
    problems: list[str] = []
    warnings: list[str] = []
    hf_config = _model_problems(config, problems)
    if hf_config is not None:
        problems += _architecture_problems(config, hf_config)
        problems += export_problems(config, hf_config)
    problems += trainer_argument_problems(config)
    problems += _data_problems(config)
    problems += output_problems(config.output.dir)
    t = config.training
    if t.max_steps > 0 and t.warmup_steps >= t.max_steps:
        warnings.append(f"training.warmup_steps: {t.warmup_steps} warm-up steps for a {t.max_steps}-step run: the "
                        f"learning rate never reaches training.learning_rate")
    if len(problems) == 1:
        raise ConfigError(problems[0])
    if problems:
        raise ConfigError(f"the run cannot start: {len(problems)} problems:\n  " + "\n  ".join(problems))
    for warning in warnings:
        log.warning("%s", warning)
    return warnings


def _model_problems(config: RunConfig, problems: list[str]) -> Any:
    from ftengine.engine.attention import choose_attn_implementation
    from ftengine.engine.pipeline import load_model_config

    m = config.model
    path = Path(m.name_or_path).expanduser()
    if path.is_dir():
        problems += local_model_problems(path, m.allow_pickle)
    try:
        hf_config = load_model_config(m.name_or_path, m.trust_remote_code, m.revision)
    except FtengineError as exc:
        problems.append(str(exc))
        return None
    try:
        attention = choose_attn_implementation(m.attn_implementation, config.data.packing, hf_config, training=True)
    except ConfigError as exc:
        problems.append(str(exc))
    else:
        problems += _generation_problems(config, hf_config, attention)
    return hf_config


def _generation_problems(config: RunConfig, hf_config: Any, attention: str) -> list[str]:
    """``trainer_options.generation_backend: static`` for a model the static decoder cannot serve."""
    from ftengine.engine.static_decode import static_refusal
    from ftengine.engine.static_decode import unsupported_architecture

    if config.training.trainer_options.get("generation_backend") != "static":
        return []
    why = unsupported_architecture(hf_config, attention)
    return [] if why is None else [static_refusal(why)]


def local_model_problems(path: Path, allow_pickle: bool) -> list[str]:
    """A local model directory without tokenizer files, or whose weights are only pickle files
    (which can run code when read) while ``model.allow_pickle`` is off."""
    problems = []
    if (path / "config.json").exists() and not any((path / name).exists() for name in TOKENIZER_FILES):
        problems.append(f"{path}: no tokenizer files (expected one of: {', '.join(TOKENIZER_FILES)})")
    files = [f for f in path.iterdir() if f.is_file()]
    safe = [f for f in files if f.suffix in SAFE_WEIGHTS]
    pickled = sorted(f for f in files if f.suffix in PICKLE_WEIGHTS and "training_args" not in f.name)
    if pickled and not safe and not allow_pickle:
        problems.append(f"{pickled[0]}: weights in a pickle file, which can run code when loaded; convert them to "
                        f"safetensors, or set model.allow_pickle: true for a file you trust")
    return problems


def meta_model(hf_config: Any, trust_remote_code: bool = False) -> Any:
    """The model's module tree on the meta device (no weights, no memory), or a :class:`ConfigError`
    for a config that has no causal-LM class (nor, for a vision-language config, an image-text-to-text one)."""
    from transformers import AutoModelForCausalLM
    from transformers import AutoModelForImageTextToText

    from ftengine.engine.vision import is_vision_config

    auto = AutoModelForImageTextToText if is_vision_config(hf_config) else AutoModelForCausalLM
    try:
        with torch.device("meta"):
            return auto.from_config(hf_config, trust_remote_code=trust_remote_code)
    except ValueError:
        raise ConfigError(f"model.name_or_path: a {hf_config.model_type!r} model is not a causal language model "
                          f"(transformers has no {auto.__name__} class for it); ftengine trains causal LMs and "
                          f"image-text-to-text models") from None


def _architecture_problems(config: RunConfig, hf_config: Any) -> list[str]:
    try:
        model = meta_model(hf_config, config.model.trust_remote_code)
    except ConfigError as exc:
        return [str(exc)]
    names = [name for name, _ in model.named_modules() if name]
    problems = []
    lora = config.lora
    if not config.model.full_finetuning:
        if isinstance(lora.target_modules, str) and lora.target_modules != "all-linear":
            if not any(re.fullmatch(lora.target_modules, name) for name in names):
                problems.append(f"lora.target_modules: the pattern {lora.target_modules!r} matches no module of "
                                f"this {hf_config.model_type} model")
        elif isinstance(lora.target_modules, list):
            unmatched = [t for t in lora.target_modules if not any(n == t or n.endswith("." + t) for n in names)]
            if unmatched and not _peft_maps_targets(config, hf_config, unmatched):
                problems += _unknown_modules("lora.target_modules", unmatched, names, hf_config.model_type)
        problems += _unknown_modules("lora.modules_to_save", lora.modules_to_save or [], names,
                                     hf_config.model_type)
        if lora.lora_dropout and not problems:
            problems += _lora_dropout_problems(config, hf_config, model)
    return problems


def export_problems(config: RunConfig, hf_config: Any) -> list[str]:
    """What each export entry's exporter finds wrong with this run before it trains (its optional
    ``check``), each line prefixed with the entry (``export[1] (gguf): ...``)."""
    problems = []
    for i, entry in enumerate(config.export):
        exporter = plugins.get("exporters", entry.format)
        check = getattr(exporter, "check", None)
        if check is not None:
            problems += [f"export[{i}] ({entry.format}): {line}"
                         for line in check(export_options(entry), config, hf_config)]
    return problems


def _peft_maps_targets(config: RunConfig, hf_config: Any, targets: list[str]) -> bool:
    """Whether peft attaches LoRA to ``targets`` (names of no module) on a fresh meta model: it maps the
    per-expert names of mixture-of-experts checkpoints (``gate_proj``, ``w1``, ...) onto transformers 5's
    fused expert parameters (gate and up together)."""
    from peft import get_peft_model

    from ftengine.engine.pipeline import find_adapter
    from ftengine.engine.pipeline import peft_lora_config

    model = meta_model(hf_config, config.model.trust_remote_code)
    lora = config.lora.model_copy(update={"lora_dropout": 0.0, "target_modules": targets, "modules_to_save": None})
    peft_config, _ = peft_lora_config(lora, find_adapter(hf_config, config.model.adapter), model)
    try:
        get_peft_model(model, peft_config)
    except ValueError:
        return False
    return True


def _lora_dropout_problems(config: RunConfig, hf_config: Any, model: Any) -> list[str]:
    """LoRA attached to the meta model as the run will attach it: peft refuses dropout on fused expert weights."""
    from ftengine.engine.pipeline import attach_lora
    from ftengine.engine.pipeline import find_adapter
    from ftengine.engine.pipeline import peft_lora_config

    peft_config, _ = peft_lora_config(config.lora, find_adapter(hf_config, config.model.adapter), model)
    try:
        attach_lora(model, peft_config)
    except ConfigError as exc:
        return [str(exc)]
    return []


def _unknown_modules(key: str, wanted: list[str], names: list[str], model_type: str) -> list[str]:
    """peft's rule: a name matches a module whose dotted name is it or ends with ``.`` + it."""
    leaves = sorted({name.rsplit(".", 1)[-1] for name in names if not re.search(r"\.\d+$", name)})
    missing = [w for w in wanted if not any(n == w or n.endswith("." + w) for n in names)]
    if not missing:
        return []
    return [f"{key}: {', '.join(repr(m) for m in missing)} match no module of this {model_type} model; "
            f"its module names: {', '.join(leaves)}"]


def trainer_argument_problems(config: RunConfig) -> list[str]:
    """Scheduler and optimizer names against transformers' own lists."""
    from transformers.trainer_utils import SchedulerType
    from transformers.training_args import OptimizerNames

    problems = []
    for key, value, allowed in (("training.lr_scheduler_type", config.training.lr_scheduler_type, SchedulerType),
                                ("training.optim", config.training.optim, OptimizerNames)):
        names = [item.value for item in allowed]
        if value not in names:
            problems.append(f"{key}: {value!r} is not a transformers name; choose one of: {', '.join(names)}")
    return problems


def _data_problems(config: RunConfig) -> list[str]:
    from ftengine.engine.data import LOCAL_SUFFIXES
    from ftengine.engine.data import resolve_files

    if not config.data.path:
        return ["data.path: required for a run (a .jsonl/.json/.parquet/.csv file, directory, glob or hub "
                "dataset id)"]
    problems = []
    for key, path in (("data.path", config.data.path), ("data.eval_path", config.data.eval_path)):
        if not path:
            continue
        try:
            files = resolve_files(path) or []
        except FtengineError as exc:
            problems.append(str(exc))
            continue
        for file in files:
            if file.suffix not in LOCAL_SUFFIXES:
                problems.append(f"{file}: unknown data file extension {file.suffix!r} ({key}); expected one of: "
                                f"{', '.join(LOCAL_SUFFIXES)}")
            elif file.suffix in TEXT_SUFFIXES:
                problem = utf8_problem(file)
                if problem:
                    problems.append(problem)
    return problems


def utf8_problem(path: Path, chunk: int = 1 << 20) -> str | None:
    """Where ``path`` stops being UTF-8 text, or ``None`` (read in chunks, never whole)."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    offset = 0
    with path.open("rb") as handle:
        while True:
            block = handle.read(chunk)
            try:
                decoder.decode(block, final=not block)
            except UnicodeDecodeError as exc:
                where = offset + exc.start
                line = 1 + _count_newlines(path, where)
                return f"{path}: line {line}: not UTF-8 text (byte 0x{block[exc.start]:02x} at offset {where}); " \
                       f"save the file as UTF-8"
            if not block:
                return None
            offset += len(block)


def _count_newlines(path: Path, end: int) -> int:
    with path.open("rb") as handle:
        return handle.read(end).count(b"\n")


def output_problems(parent: str) -> list[str]:
    """``output.dir`` must be a directory this process can create run directories in."""
    path = Path(parent).expanduser()
    if path.exists() and not path.is_dir():
        return [f"output.dir: {path} is a file, not a directory"]
    existing = next((p for p in (path, *path.parents) if p.exists()), None)
    if existing is not None and not os.access(existing, os.W_OK | os.X_OK):
        return [f"output.dir: cannot create run directories under {path} ({existing} is not writable)"]
    return []


def remote_code_hint(path: Path) -> str | None:
    """The ``trust_remote_code`` line for a model whose config names classes in its repository."""
    try:
        auto_map = json.loads((path / "config.json").read_text()).get("auto_map")
    except (OSError, ValueError):
        return None
    if auto_map:
        return ("its code lives in the model repository (config.json auto_map); set model.trust_remote_code: true "
                "(trust_remote_code=True in Python) only for a repository you trust")
    return None
