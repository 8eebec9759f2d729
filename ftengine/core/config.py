"""The run config: a typed schema with a description on every key, YAML loading, and validation
that reports every problem at once, each with its key path (``training.lerning_rate: unknown key;
did you mean training.learning_rate?``).

Names that plugins provide (formats, chat templates, trainers, exporters, model adapters) are
checked against the registries, and each ``export:`` entry against its exporter's own options
schema.
"""

from __future__ import annotations

import math
import re
import warnings
from pathlib import Path
from typing import Any
from typing import Literal

import yaml
from pydantic import BaseModel
from pydantic import ConfigDict
from pydantic import Field
from pydantic import ValidationError
from pydantic import field_validator
from pydantic import model_validator

from ftengine.core.config_errors import format_errors
from ftengine.core.config_errors import key_path
from ftengine.core.config_errors import problems_error
from ftengine.core.errors import ConfigError


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


class RopeScalingConfig(Section):
    """Rotary-embedding scaling for a context longer than the model was trained with (transformers' names)."""

    rope_type: Literal["linear", "dynamic", "yarn", "llama3", "longrope"] = Field(
        description="linear (positions divided by factor), dynamic (NTK base growth past the original context), "
                    "yarn, llama3 (Llama 3.1's frequency-dependent scaling) or longrope (Phi-3's per-frequency "
                    "short/long factors).")
    factor: float | None = Field(None, ge=1, description="New context / original context; required except for "
                                                         "longrope (default: max_position_embeddings / original).")
    original_max_position_embeddings: int | None = Field(
        None, gt=0, description="The context the model was trained with; default: the model's "
                                "max_position_embeddings, which becomes original x factor (dynamic keeps it).")
    attention_factor: float | None = Field(None, gt=0, description="yarn / longrope: scale of cos and sin; default "
                                                                   "from factor as transformers computes it.")
    beta_fast: float | None = Field(None, description="yarn: rotations where extrapolation stops (default 32).")
    beta_slow: float | None = Field(None, description="yarn: rotations where interpolation starts (default 1).")
    low_freq_factor: float | None = Field(None, description="llama3: wavelengths past original / low_freq_factor "
                                                            "are scaled fully (default 1).")
    high_freq_factor: float | None = Field(None, description="llama3: wavelengths under original / high_freq_factor "
                                                             "are kept (default 4).")
    short_factor: list[float] | None = Field(None, description="longrope: per-frequency divisors up to the original "
                                                               "context (head_dim / 2 values).")
    long_factor: list[float] | None = Field(None, description="longrope: per-frequency divisors past the original "
                                                              "context (head_dim / 2 values).")


ROPE_SCALING_KEYS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "linear": (("factor",), ()),
    "dynamic": (("factor",), ()),
    "yarn": (("factor",), ("original_max_position_embeddings", "attention_factor", "beta_fast", "beta_slow")),
    "llama3": (("factor",), ("original_max_position_embeddings", "low_freq_factor", "high_freq_factor")),
    "longrope": (("short_factor", "long_factor"), ("factor", "original_max_position_embeddings", "attention_factor")),
}
"""``rope_type`` -> (required keys, optional keys) of ``model.rope_scaling``."""


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
    rope_scaling: RopeScalingConfig | None = Field(
        None, description="RoPE scaling applied to the model's config before it is built, to train past its "
                          "context (e.g. {rope_type: yarn, factor: 4}); exports carry it.")
    adapter: str | None = Field(None, description="Model adapter (architecture plugin) to use; default: the one "
                                                  "serving the model's config.model_type.")
    trust_remote_code: bool = Field(False, description="Allow model code from the hub repository.")
    allow_pickle: bool = Field(False, description="Allow loading weights from pickle files (.bin/.pt), which can run "
                                                  "code when read; by default only safetensors weights load.")
    revision: str | None = Field(None, description="Hub revision (branch, tag or commit).")


class QuantizationConfig(Section):
    load_in_4bit: bool = Field(False, description="QLoRA: load the base in 4-bit (bitsandbytes).")
    load_in_8bit: bool = Field(False, description="Load the base in 8-bit (bitsandbytes LLM.int8).")
    bnb_4bit_quant_type: Literal["nf4", "fp4"] = Field("nf4", description="4-bit data type.")
    bnb_4bit_use_double_quant: bool = Field(True, description="Quantize the 4-bit block scales too.")
    bnb_4bit_compute_dtype: Literal["bfloat16", "float16", "float32"] = Field(
        "bfloat16", description="dtype the 4-bit weights are dequantized to for matmuls.")


class LoftQConfig(Section):
    """LoftQ initialisation (``lora.init_lora_weights: loftq``), peft's ``LoftQConfig`` names."""

    loftq_bits: Literal[4, 8] = Field(4, description="Bits of the quantization the adapters compensate: 4 (NF4, "
                                                     "as load_in_4bit) or 8 (int8, as load_in_8bit).")
    loftq_iter: int = Field(1, gt=0, description="Alternating quantize / low-rank steps.")


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
        True, description="peft initialisation of the adapters; loftq quantizes the (unquantized) base weights "
                          "and starts the adapters at the best low-rank fit of the quantization error.")
    loftq_config: LoftQConfig | None = Field(None, description="LoftQ settings (with init_lora_weights: loftq; "
                                                               "default 4 bits, 1 iteration).")
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
    max_steps: int = Field(-1, ge=-1, description="Optimizer steps; -1 = run num_train_epochs.")
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
    save_total_limit: int | None = Field(2, ge=1, description="Keep at most N checkpoints (None: all).")
    gradient_checkpointing: bool | Literal["offload", "auto"] = Field(
        "auto", description="auto (default: recompute only the layers whose activations would not fit in GPU "
                            "memory), true (recompute every layer), offload (every layer, inputs in CPU RAM) or false.")
    eval_steps: int | None = Field(None, gt=0, description="Evaluate every N steps (needs eval data).")
    early_stopping_patience: int | None = Field(None, gt=0, description="Stop after N evaluations without "
                                                                        "improvement of metric_for_best_model.")
    metric_for_best_model: str | None = Field(None, description="Metric that picks the best checkpoint (eval_loss "
                                                                "when early stopping or load_best_model_at_end is on).")
    load_best_model_at_end: bool = Field(False, description="End with the best checkpoint's weights (save_steps must "
                                                            "be a multiple of eval_steps).")
    report_to: Literal["none", "tensorboard", "wandb", "mlflow"] | list[Literal["tensorboard", "wandb", "mlflow"]] = \
        Field("none", description="Also log through transformers' integrations (the package must be installed).")
    on_nonfinite: Literal["stop", "skip_step"] = Field(
        "stop", description="A non-finite loss, gradient norm or learning rate: stop the run at once, keeping the "
                            "last good checkpoint (stop), or skip that optimizer step (skip_step).")
    max_nonfinite_steps: int = Field(10, ge=0, description="skip_step: the run stops once more steps than this "
                                                           "were skipped.")
    trainer_options: dict[str, Any] = Field(
        default_factory=dict, description="The trainer's own options (dpo: beta, loss_type; grpo: num_generations, "
                                          "reward_funcs, ...), validated against its options schema; see "
                                          "`ftengine config-schema` under trainer_options.")

    @model_validator(mode="before")
    @classmethod
    def _legacy_trainer_keys(cls, values: Any) -> Any:
        try:
            return move_legacy_trainer_keys(values)
        except ValueError:  # both spellings: check_trainer_options reports it
            return values


LEGACY_TRAINER_KEYS = ("beta", "loss_type")
"""Trainer options that were ``training:`` keys before trainers owned their options."""


def move_legacy_trainer_keys(training: Any) -> Any:
    """``training.beta`` / ``training.loss_type`` (older configs) moved into ``training.trainer_options``
    with a deprecation warning; a key given in both places is an error."""
    if not isinstance(training, dict) or not any(k in training for k in LEGACY_TRAINER_KEYS):
        return training
    training = dict(training)
    options = training.get("trainer_options")
    options = dict(options) if isinstance(options, dict) else {}
    for key in LEGACY_TRAINER_KEYS:
        if key not in training:
            continue
        if key in options:
            raise ValueError(f"training.{key} and training.trainer_options.{key} are both set; keep only "
                             f"training.trainer_options.{key}")
        options[key] = training.pop(key)
        warnings.warn(f"training.{key} is deprecated: write it as training.trainer_options.{key}",
                      DeprecationWarning, stacklevel=2)
    training["trainer_options"] = options
    return training


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

    @field_validator("name")
    @classmethod
    def _plain_name(cls, value: str | None) -> str | None:
        if value is not None and (not value.strip() or value in (".", "..") or "/" in value or "\\" in value
                                  or "\0" in value):
            raise ValueError("a plain directory name (no '/', '\\', '..' or empty name)")
        return value


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


def non_finite_values(raw: Any, path: tuple[Any, ...] = ()) -> list[str]:
    """Every ``inf`` / ``nan`` number anywhere in a raw config (exporter options included), by key path."""
    if isinstance(raw, float) and not math.isfinite(raw):
        return [f"{key_path(path)}: expected a finite number, got {raw!r} (float)"]
    if isinstance(raw, dict):
        return [line for key, value in raw.items() for line in non_finite_values(value, (*path, key))]
    if isinstance(raw, list):
        return [line for i, value in enumerate(raw) for line in non_finite_values(value, (*path, i))]
    return []


def validate_config(raw: Any, source: str = "config") -> RunConfig:
    """Validate a config mapping; a :class:`ConfigError` listing every problem otherwise."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: expected a mapping of sections (model, data, training, ...), "
                          f"got {type(raw).__name__}")
    non_finite = non_finite_values(raw)
    try:
        config = RunConfig.model_validate(raw)
    except ValidationError as exc:
        lines = non_finite + format_errors(exc.errors(), root=RunConfig) + check_plugin_names(raw)
        raise problems_error(source, sorted(dict.fromkeys(lines))) from None
    problems = non_finite + check_plugin_names(raw) + check_combinations(config)
    if problems:
        raise problems_error(source, problems)
    return config


def validate_section(section: type[Section], values: dict[str, Any], name: str) -> Any:
    """Validate the keyword arguments of a Python API call against one config section."""
    try:
        return section.model_validate(values)
    except ValidationError as exc:
        errors = [dict(e, loc=(name, *e["loc"])) for e in exc.errors()]
        lines = format_errors(errors, fields=list(section.model_fields))
        raise ConfigError(f"{name}: " + "; ".join(lines)) from None


HUB_OPTIONS = ("push_to_hub", "private")
"""Keys every ``export:`` entry takes besides its exporter's own: upload the export to this Hub
repository (``owner/name``; the token from ``HF_TOKEN`` or the saved login), privately or not."""
HUB_REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,95}/[A-Za-z0-9][A-Za-z0-9_.-]{0,95}$")


def _hub_problems(i: int, entry: dict[str, Any]) -> list[str]:
    problems = []
    repo = entry.get("push_to_hub")
    if repo is not None and not (isinstance(repo, str) and HUB_REPO_ID.match(repo) and ".." not in repo):
        problems.append(f"export[{i}].push_to_hub: expected a Hub repository id 'owner/name', got {repo!r}")
    if "private" in entry and not isinstance(entry["private"], bool):
        problems.append(f"export[{i}].private: expected true or false, got {entry['private']!r}")
    return problems


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
    problems += check_trainer_options(section("training"))
    check("model.adapter", section("model").get("adapter"), "models")
    exporters = get_registry("exporters")
    entries = raw.get("export")
    for i, entry in enumerate(entries if isinstance(entries, list) else []):
        if not isinstance(entry, dict):
            continue
        check(f"export[{i}].format", entry.get("format"), "exporters")
        problems += _hub_problems(i, entry)
        exporter = exporters.get(entry.get("format"))
        if exporter is not None and exporter.options_schema is not None:
            options = {k: v for k, v in entry.items() if k != "format" and k not in HUB_OPTIONS}
            try:
                exporter.options_schema.model_validate(options)
            except ValidationError as exc:
                errs = [dict(e, loc=("export", i, *e["loc"])) for e in exc.errors()]
                problems += format_errors(errs, fields=[*exporter.options_schema.model_fields, *HUB_OPTIONS])
    return problems


def check_trainer_options(training: dict[str, Any]) -> list[str]:
    """The problems of a raw ``training:`` mapping's ``trainer_options`` against its trainer's schema."""
    from ftengine.core.plugins import get_registry

    try:
        training = move_legacy_trainer_keys(training)
    except ValueError as exc:
        return [str(exc)]
    name = training.get("trainer", "sft")
    trainer = get_registry("trainers").get(name) if isinstance(name, str) else None  # other types: the schema says
    options = training.get("trainer_options") or {}
    if trainer is None or not isinstance(options, dict):
        return []
    schema = getattr(trainer, "options_schema", None)
    if schema is None:
        return [f"training.trainer_options.{key}: unknown key; trainer {trainer.name!r} takes no options"
                for key in options]
    try:
        schema.model_validate(options)
    except ValidationError as exc:
        errs = [dict(e, loc=("training", "trainer_options", *e["loc"])) for e in exc.errors()]
        return format_errors(errs, fields=list(schema.model_fields))
    return []


def trainer_options(training: TrainingConfig) -> Any:
    """The validated options object of the configured trainer (its ``options_schema`` instance).

    Raises:
        ConfigError: an option the trainer's schema refuses, naming the key.
    """
    problems = check_trainer_options(training.model_dump(exclude={"trainer_options"}) |
                                     {"trainer_options": training.trainer_options})
    if problems:
        raise ConfigError("training.trainer_options: " + "; ".join(problems))
    from ftengine.core.plugins import get

    schema = getattr(get("trainers", training.trainer), "options_schema", None)
    return None if schema is None else schema.model_validate(training.trainer_options)


def check_combinations(config: RunConfig) -> list[str]:
    """Settings that are valid alone but not together."""
    problems = []
    if config.quantization.load_in_4bit and config.quantization.load_in_8bit:
        problems.append("quantization: load_in_4bit and load_in_8bit are exclusive; choose one")
    if config.model.full_finetuning and (config.quantization.load_in_4bit or config.quantization.load_in_8bit):
        problems.append("model.full_finetuning: a quantized base cannot be fully fine-tuned; use LoRA (QLoRA)")
    if config.lora.loftq_config is not None and config.lora.init_lora_weights != "loftq":
        problems.append("lora.loftq_config: used only with lora.init_lora_weights: loftq")
    if config.lora.init_lora_weights == "loftq" and (config.quantization.load_in_4bit
                                                     or config.quantization.load_in_8bit):
        problems.append("lora.init_lora_weights: loftq needs an unquantized base (it quantizes the weights itself); "
                        "drop quantization.load_in_4bit / load_in_8bit")
    if config.lora.init_lora_weights == "loftq" and config.lora.use_dora:
        problems.append("lora.init_lora_weights: loftq and lora.use_dora are exclusive")
    if config.model.full_finetuning and config.model.offload_embedding:
        problems.append("model.offload_embedding: full fine-tuning trains the embedding, which must stay on the GPU")
    t = config.training
    if (t.early_stopping_patience or t.load_best_model_at_end) and not t.eval_steps:
        problems.append("training.eval_steps: early_stopping_patience and load_best_model_at_end need evaluations; "
                        "set eval_steps (and data.eval_path or data.eval_fraction)")
    elif t.load_best_model_at_end and t.save_steps % t.eval_steps:
        problems.append(f"training.save_steps: load_best_model_at_end needs it to be a multiple of eval_steps "
                        f"({t.eval_steps}), got {t.save_steps}")
    if config.model.full_finetuning and any(e.format == "lora" for e in config.export):
        problems.append("export: 'lora' needs LoRA training; model.full_finetuning is true (use merged or gguf)")
    if config.distributed.strategy == "fsdp":
        if config.quantization.load_in_8bit:
            problems.append("distributed.strategy: fsdp cannot shard an 8-bit (LLM.int8) base; use ddp, or "
                            "quantization.load_in_4bit")
        if config.model.offload_embedding:
            problems.append("model.offload_embedding: the input embedding cannot stay in CPU memory while fsdp "
                            "shards it; turn it off or use distributed.strategy: ddp")
    if config.training.max_steps == 0:
        problems.append("training.max_steps: expected -1 (run num_train_epochs) or a positive number of steps, got 0")
    if config.training.eval_steps and not (config.data.eval_path or config.data.eval_fraction > 0):
        problems.append("training.eval_steps: evaluation needs eval data; set data.eval_path or data.eval_fraction")
    if config.model.rope_scaling is not None:
        problems += rope_scaling_problems(config.model.rope_scaling)
    return problems


def rope_scaling_problems(scaling: RopeScalingConfig, where: str = "model.rope_scaling") -> list[str]:
    """Keys a ``rope_type`` needs but lacks, and keys it does not read."""
    required, optional = ROPE_SCALING_KEYS[scaling.rope_type]
    given = {key for key, value in scaling.model_dump().items() if value is not None and key != "rope_type"}
    problems = [f"{where}.{key}: required for rope_type {scaling.rope_type}" for key in required if key not in given]
    problems += [f"{where}.{key}: not used by rope_type {scaling.rope_type} (it reads "
                 f"{', '.join(required + optional)})" for key in sorted(given - set(required) - set(optional))]
    if scaling.short_factor is not None and scaling.long_factor is not None and (
            len(scaling.short_factor) != len(scaling.long_factor)):
        problems.append(f"{where}: short_factor and long_factor must have the same length (head_dim / 2)")
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
    options = {k: v for k, v in (entry.model_extra or {}).items() if k not in HUB_OPTIONS}
    if exporter.options_schema is None:
        return options
    return exporter.options_schema.model_validate(options)


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
    """JSON schema of the run config (``ftengine config-schema``), with each registered trainer's
    ``training.trainer_options`` and each exporter's options under ``x-trainer-options`` /
    ``x-exporter-options`` (by name)."""
    from ftengine.core.plugins import get_registry

    schema = RunConfig.model_json_schema()

    def options(kind: str) -> dict[str, Any]:
        schemas = {name: getattr(obj, "options_schema", None) for name, obj in sorted(get_registry(kind).items())}
        return {name: schema.model_json_schema(mode="serialization") if schema else {}
                for name, schema in schemas.items()}

    schema["x-trainer-options"] = options("trainers")
    schema["x-exporter-options"] = options("exporters")
    return schema
