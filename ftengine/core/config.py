"""The run config: a typed schema with a description on every key, YAML loading, and validation
that reports every problem at once, each with its key path (``training.lerning_rate: unknown key;
did you mean training.learning_rate?``).

Names that plugins provide (formats, chat templates, trainers, exporters, model adapters) are
checked against the registries, and each ``export:`` entry against its exporter's own options
schema.
"""

from __future__ import annotations

import difflib
import re
from pathlib import Path
from typing import Any
from typing import Literal

import yaml
from pydantic import BaseModel
from pydantic import ConfigDict
from pydantic import Field
from pydantic import ValidationError

from ftengine.core.errors import ConfigError


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelConfig(Section):
    name_or_path: str = Field(description="Local Hugging Face model directory or hub id (e.g. Qwen/Qwen2.5-0.5B).")
    max_seq_length: int = Field(2048, gt=0, description="Longest training sequence in tokens; longer samples are "
                                                       "truncated.")
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = Field(
        "auto", description="Compute dtype; auto = bfloat16 on GPUs that support it, else float16 on GPU, float32 "
                            "on CPU.")
    full_finetuning: bool = Field(False, description="Train every weight instead of LoRA adapters.")
    offload_embedding: bool = Field(False, description="Keep the frozen input-embedding table in CPU memory mapped "
                                                       "for the GPU, which reads only the rows it needs (saves ~1 "
                                                       "GiB of GPU memory for 8B models; not for tied or trained "
                                                       "embeddings).")
    attn_implementation: Literal["auto", "sdpa", "flex_attention", "eager"] = Field(
        "auto", description="Attention implementation (Hugging Face's attn_implementation); auto = flex_attention "
                            "when data.packing is on and a CUDA GPU is present (its document mask skips the blocks "
                            "across packed samples), else sdpa (eager for models without sdpa). flex_attention "
                            "trains on CUDA only.")
    adapter: str | None = Field(None, description="Model adapter (architecture plugin) to use; default: the one "
                                                  "serving the model's config.model_type.")
    trust_remote_code: bool = Field(False, description="Allow model code from the hub repository.")
    revision: str | None = Field(None, description="Hub revision (branch, tag or commit).")


class QuantizationConfig(Section):
    load_in_4bit: bool = Field(False, description="QLoRA: load the base in 4-bit (bitsandbytes).")
    load_in_8bit: bool = Field(False, description="Load the base in 8-bit (bitsandbytes LLM.int8).")
    bnb_4bit_quant_type: Literal["nf4", "fp4"] = Field("nf4", description="4-bit data type.")
    bnb_4bit_use_double_quant: bool = Field(True, description="Quantize the 4-bit block scales too.")
    bnb_4bit_compute_dtype: Literal["bfloat16", "float16", "float32"] = Field(
        "bfloat16", description="dtype the 4-bit weights are dequantized to for matmuls.")


class LoRAConfig(Section):
    r: int = Field(16, gt=0, description="LoRA rank.")
    lora_alpha: float = Field(16, gt=0, description="LoRA scaling numerator (scaling = lora_alpha / r).")
    lora_dropout: float = Field(0.0, ge=0, lt=1, description="Dropout on the LoRA input (0 enables fused ops).")
    target_modules: str | list[str] = Field("all-linear", description="Modules to adapt: 'all-linear' (the "
                                                                     "architecture's projections) or names.")
    target_parameters: list[str] | None = Field(None, description="nn.Parameters to adapt (peft's "
                                                "target_parameters), e.g. a mixture-of-experts model's fused "
                                                "mlp.experts.gate_up_proj, mlp.experts.down_proj, mlp.gate.weight.")
    bias: Literal["none", "all", "lora_only"] = Field("none", description="Which biases to train.")
    use_rslora: bool = Field(False, description="Rank-stabilised LoRA (scaling = lora_alpha / sqrt(r)).")
    use_dora: bool = Field(False, description="Weight-decomposed LoRA (DoRA).")
    init_lora_weights: bool | Literal["gaussian", "pissa", "pissa_niter_4", "olora", "loftq"] = Field(
        True, description="peft initialisation of the adapters.")
    modules_to_save: list[str] | None = Field(None, description="Extra modules trained in full (e.g. embed_tokens, "
                                                                "lm_head for added tokens).")
    finetune_vision_layers: bool = Field(True, description="Vision-language models with all-linear targets: "
                                         "LoRA on the vision tower's layers.")
    finetune_language_layers: bool = Field(True, description="Vision-language models with all-linear targets: "
                                           "LoRA on the language tower's layers.")
    finetune_attention_modules: bool = Field(True, description="Vision-language models with all-linear targets: "
                                             "LoRA on the attention projections.")
    finetune_mlp_modules: bool = Field(True, description="Vision-language models with all-linear targets: LoRA on "
                                       "the MLP projections.")


class DataConfig(Section):
    path: str | None = Field(None, description="Training data: a .jsonl/.json/.parquet/.csv file, a directory or glob "
                                               "of them, or a hub dataset id.")
    format: str = Field("auto", description="Dataset format name (see `ftengine plugins`), or auto to detect it.")
    chat_template: str | None = Field(None, description="Chat template name; default: the tokenizer's own if it "
                                                        "has one, else the model adapter's default.")
    columns: dict[str, str] = Field(default_factory=dict, description="Rename columns before format detection: "
                                                                      "{dataset_column: expected_column}.")
    split: str = Field("train", description="Split of a hub dataset.")
    subset: str | None = Field(None, description="Subset (config name) of a hub dataset.")
    eval_path: str | None = Field(None, description="Separate evaluation data.")
    eval_fraction: float = Field(0.0, ge=0, lt=1, description="Fraction of the training rows held out for "
                                                              "evaluation (seeded).")
    train_on: Literal["assistant", "all", "last"] = Field(
        "assistant", description="assistant: every assistant turn; last: only the final one; all: every token.")
    packing: bool = Field(False, description="Pack samples into full max_seq_length rows.")
    on_bad_rows: Literal["error", "skip"] = Field("error", description="error: stop at the first malformed row; "
                                                                       "skip: skip and report them.")
    max_rows: int | None = Field(None, gt=0, description="Use only the first N rows.")
    seed: int = Field(3407, description="Seed for shuffling and held-out splits.")
    instruction: str | None = Field(None, description="Image+text rows (format vision): the user's instruction "
                                    "before each image, e.g. 'Write the LaTeX for this image.'")
    max_pixels: int | None = Field(None, gt=0, description="Vision-language models with dynamic resolution "
                                   "(Qwen2-VL): images larger than this many pixels are scaled down.")
    min_pixels: int | None = Field(None, gt=0, description="Vision-language models with dynamic resolution: images "
                                   "smaller than this many pixels are scaled up.")


class TrainingConfig(Section):
    trainer: str = Field("sft", description="Trainer name (sft, dpo, ...).")
    max_steps: int = Field(-1, description="Optimizer steps; -1 = run num_train_epochs.")
    num_train_epochs: float = Field(1.0, gt=0, description="Epochs when max_steps is -1.")
    per_device_train_batch_size: int = Field(2, gt=0, description="Micro-batch size.")
    gradient_accumulation_steps: int = Field(4, gt=0, description="Micro-batches per optimizer step.")
    learning_rate: float = Field(2e-4, gt=0, description="Peak learning rate.")
    lr_scheduler_type: str = Field("linear", description="transformers scheduler name (linear, cosine, constant...).")
    warmup_steps: int = Field(0, ge=0, description="Linear warm-up steps.")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay.")
    optim: str = Field("adamw_torch", description="transformers optimizer name.")
    max_grad_norm: float = Field(1.0, ge=0, description="Gradient clipping norm (0 disables).")
    seed: int = Field(3407, description="Random seed (weights init of adapters, data order, dropout).")
    logging_steps: int = Field(1, gt=0, description="Log metrics every N steps.")
    save_steps: int = Field(100, gt=0, description="Checkpoint every N steps.")
    save_total_limit: int | None = Field(2, description="Keep at most N checkpoints (None: all).")
    gradient_checkpointing: bool | Literal["offload", "auto"] = Field(
        "auto", description="auto (default: recompute only the layers whose activations would not fit in GPU "
                            "memory), true (recompute every layer), offload (every layer, inputs in CPU RAM) or false.")
    eval_steps: int | None = Field(None, gt=0, description="Evaluate every N steps (needs eval data).")
    beta: float = Field(0.1, gt=0, description="DPO: the KL penalty strength.")
    loss_type: str = Field("sigmoid", description="DPO: trl loss type (sigmoid, ipo, hinge, ...).")


class DistributedConfig(Section):
    num_processes: int = Field(1, gt=0, description="Processes to train on, one per GPU (on a CPU host: CPU "
                                                   "processes over gloo); above 1, `ftengine run` launches them "
                                                   "through torchrun itself (the same as --gpus N). Under an "
                                                   "outer torchrun / accelerate launch the launcher decides.")
    strategy: Literal["auto", "ddp", "fsdp"] = Field(
        "auto", description="ddp: every process holds the whole model, gradients of the trained weights are "
                            "all-reduced (LoRA / QLoRA); fsdp: FSDP2, every decoder layer's weights, gradients and "
                            "optimizer state sharded across the processes (full fine-tuning, models that do not fit "
                            "one GPU); auto: ddp if the model's training state fits one device, else fsdp.")
    fsdp_reshard_after_forward: bool = Field(True, description="fsdp: free each layer's gathered weights after its "
                                                               "forward (less memory; gathered again for the "
                                                               "backward).")


class ExportEntry(BaseModel):
    """One export; keys other than ``format`` are the exporter's own options."""

    model_config = ConfigDict(extra="allow")
    format: str = Field(description="Exporter name (lora, merged, gguf, ...).")


class OutputConfig(Section):
    dir: str = Field("runs", description="Parent directory of run directories.")
    name: str | None = Field(None, description="Run name; default: the model directory's name.")


class RunConfig(Section):
    model: ModelConfig
    quantization: QuantizationConfig = Field(default_factory=QuantizationConfig)
    lora: LoRAConfig = Field(default_factory=LoRAConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    training: TrainingConfig = Field(default_factory=TrainingConfig)
    export: list[ExportEntry] = Field(default_factory=lambda: [ExportEntry(format="lora"),
                                                               ExportEntry(format="merged")])
    output: OutputConfig = Field(default_factory=OutputConfig)
    distributed: DistributedConfig = Field(default_factory=DistributedConfig)


_TYPE_WORDS = {
    "int": "an integer", "float": "a number", "bool": "true or false", "string": "a string",
    "dict": "a mapping", "list": "a list", "literal": "one of",
}


def _model_at(loc: tuple[Any, ...]) -> type[BaseModel] | None:
    """The schema class of the section that holds the key at ``loc`` (None inside free-form values)."""
    model: type[BaseModel] = RunConfig
    for part in loc[:-1]:
        if isinstance(part, int):
            continue
        field = model.model_fields.get(part)
        if field is None:
            return None
        annotation = field.annotation
        args = getattr(annotation, "__args__", ())
        candidates = [annotation, *args]
        nested = [c for c in candidates if isinstance(c, type) and issubclass(c, BaseModel)]
        if not nested:
            return None
        model = nested[0]
    return model


def _path(loc: tuple[Any, ...]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


_TYPE_TAGS = ("bool", "int", "float", "str", "list", "dict", "none", "literal", "function")


def _clean_loc(loc: tuple[Any, ...]) -> tuple[Any, ...]:
    """Drop pydantic's union-branch tags (``bool``, ``literal['offload','auto']``) from a location."""
    return tuple(p for p in loc if not (isinstance(p, str) and (p.split("[")[0].split("-")[0] in _TYPE_TAGS)
                                        and p not in ("dict",)))


def _expected(err: dict[str, Any]) -> str:
    kind = err["type"]
    if kind == "literal_error":
        return err["ctx"]["expected"]
    return next((word for key, word in _TYPE_WORDS.items() if kind.startswith(key)), err["msg"])


def _format_errors(errors: list[dict[str, Any]], fields: list[str] | None = None) -> list[str]:
    """One line per key: unknown keys with a suggestion, missing keys, and wrong values with what
    was expected (the branches of a union merged into one line). ``fields`` overrides the valid
    keys offered for unknown ones (an exporter's options)."""
    by_path: dict[tuple[Any, ...], list[dict[str, Any]]] = {}
    for err in errors:
        by_path.setdefault(_clean_loc(err["loc"]), []).append(err)
    lines = []
    for loc, errs in by_path.items():
        path = _path(loc)
        kind = errs[0]["type"]
        if kind == "extra_forbidden":
            model = _model_at(loc)
            known = fields if fields is not None else (list(model.model_fields) if model else [])
            parent = _path(loc[:-1])
            close = difflib.get_close_matches(str(loc[-1]), known, n=1, cutoff=0.6)
            prefix = f"{parent}." if parent else ""
            if close:
                lines.append(f"{path}: unknown key; did you mean {prefix}{close[0]}?")
            else:
                lines.append(f"{path}: unknown key; expected one of: {', '.join(prefix + k for k in known)}")
        elif kind == "missing":
            lines.append(f"{path}: required key is missing")
        else:
            value = errs[0].get("input")
            expected = " or ".join(dict.fromkeys(_expected(e) for e in errs))
            lines.append(f"{path}: expected {expected}, got {value!r} ({type(value).__name__}){_suggest(value, errs)}")
    return lines


def _suggest(value: Any, errs: list[dict[str, Any]]) -> str:
    """``; did you mean 'x'?`` when a string is close to one of the allowed strings (``flex-attention``)."""
    if not isinstance(value, str):
        return ""
    choices = [c for e in errs if e["type"] == "literal_error" for c in re.findall(r"'([^']*)'", e["ctx"]["expected"])]
    close = difflib.get_close_matches(value, choices, n=1, cutoff=0.6)
    return f"; did you mean {close[0]!r}?" if close else ""


def _problems(raw: Any, source: str, lines: list[str]) -> ConfigError:
    return ConfigError(f"{source}: {len(lines)} problem(s):\n  " + "\n  ".join(lines))


def validate_config(raw: Any, source: str = "config") -> RunConfig:
    """Validate a config mapping; a :class:`ConfigError` listing every problem otherwise."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: expected a mapping of sections (model, data, training, ...), "
                          f"got {type(raw).__name__}")
    try:
        config = RunConfig.model_validate(raw)
    except ValidationError as exc:
        lines = _format_errors(exc.errors()) + check_plugin_names(raw)
        raise _problems(raw, source, sorted(dict.fromkeys(lines))) from None
    problems = check_plugin_names(raw) + check_combinations(config)
    if problems:
        raise _problems(raw, source, problems)
    return config


def validate_section(section: type[Section], values: dict[str, Any], name: str) -> Any:
    """Validate the keyword arguments of a Python API call against one config section."""
    try:
        return section.model_validate(values)
    except ValidationError as exc:
        errors = [dict(e, loc=(name, *e["loc"])) for e in exc.errors()]
        lines = _format_errors(errors, fields=list(section.model_fields))
        raise ConfigError(f"{name}: " + "; ".join(lines)) from None


def check_plugin_names(raw: dict[str, Any]) -> list[str]:
    """Every plugin-provided name in a raw config that no plugin registered, and every invalid
    exporter option. Works on the raw mapping so these are reported together with schema errors."""
    from ftengine.core.plugins import get_registry

    problems = []

    def section(name: str) -> dict[str, Any]:
        value = raw.get(name)
        return value if isinstance(value, dict) else {}

    def check(path: str, name: Any, kind: str, extra: tuple[str, ...] = ()) -> None:
        registry = get_registry(kind)
        if isinstance(name, str) and name not in registry and name not in extra:
            choices = ", ".join([*extra, *sorted(registry)]) or "(none registered)"
            problems.append(f"{path}: {name!r} is not a registered {kind[:-1].replace('_', ' ')}; choices: {choices}")

    check("data.format", section("data").get("format"), "formats", extra=("auto",))
    check("data.chat_template", section("data").get("chat_template"), "chat_templates")
    check("training.trainer", section("training").get("trainer"), "trainers")
    check("model.adapter", section("model").get("adapter"), "models")
    exporters = get_registry("exporters")
    entries = raw.get("export")
    for i, entry in enumerate(entries if isinstance(entries, list) else []):
        if not isinstance(entry, dict):
            continue
        check(f"export[{i}].format", entry.get("format"), "exporters")
        exporter = exporters.get(entry.get("format"))
        if exporter is not None and exporter.options_schema is not None:
            options = {k: v for k, v in entry.items() if k != "format"}
            try:
                exporter.options_schema.model_validate(options)
            except ValidationError as exc:
                errs = [dict(e, loc=("export", i, *e["loc"])) for e in exc.errors()]
                problems += _format_errors(errs, fields=list(exporter.options_schema.model_fields))
    return problems


def check_combinations(config: RunConfig) -> list[str]:
    """Settings that are valid alone but not together."""
    problems = []
    if config.quantization.load_in_4bit and config.quantization.load_in_8bit:
        problems.append("quantization: load_in_4bit and load_in_8bit are exclusive; choose one")
    if config.model.full_finetuning and (config.quantization.load_in_4bit or config.quantization.load_in_8bit):
        problems.append("model.full_finetuning: a quantized base cannot be fully fine-tuned; use LoRA (QLoRA)")
    if config.model.full_finetuning and config.model.offload_embedding:
        problems.append("model.offload_embedding: full fine-tuning trains the embedding, which must stay on the GPU")
    if config.model.full_finetuning and any(e.format == "lora" for e in config.export):
        problems.append("export: 'lora' needs LoRA training; model.full_finetuning is true (use merged or gguf)")
    if config.distributed.strategy == "fsdp":
        if config.quantization.load_in_8bit:
            problems.append("distributed.strategy: fsdp cannot shard an 8-bit (LLM.int8) base; use ddp, or "
                            "quantization.load_in_4bit")
        if config.model.offload_embedding:
            problems.append("model.offload_embedding: the input embedding cannot stay in CPU memory while fsdp "
                            "shards it; turn it off or use distributed.strategy: ddp")
    return problems


def validate_exports(entries: list[dict[str, Any]], source: str, base: RunConfig | None = None) -> list[ExportEntry]:
    """``export:`` entries given outside a config file (``ftengine export``, the Python API), checked
    exactly as a config's (:func:`check_plugin_names`, :func:`check_combinations`) against the run
    they export (``base``; a LoRA run when ``None``)."""
    raw = base.model_dump(mode="json") if base is not None else {"model": {"name_or_path": "-"}}
    return validate_config({**raw, "export": entries}, source=source).export


def export_options(entry: ExportEntry) -> Any:
    """The validated options object of one ``export:`` entry."""
    from ftengine.core.plugins import get

    exporter = get("exporters", entry.format)
    if exporter.options_schema is None:
        return entry.model_extra or {}
    return exporter.options_schema.model_validate(entry.model_extra or {})


def load_config(path: str | Path) -> RunConfig:
    """Read and validate a YAML run config."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError(f"{path}: not valid YAML{where}: {problem}") from None
    return validate_config(raw if raw is not None else {}, source=str(path))


def dump_config(config: RunConfig) -> str:
    """The resolved config as YAML (what the run directory stores)."""
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)


def config_schema() -> dict[str, Any]:
    """JSON schema of the run config (``ftengine config-schema``)."""
    return RunConfig.model_json_schema()
