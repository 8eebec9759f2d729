"""The one place a run's flow lives: load -> patch -> adapt -> data -> train -> export.

Each stage is a function taking what the previous returned; the CLI (``ftengine run``) and the
Python API (``ftengine.load_model`` ...) both call them.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import time
from dataclasses import dataclass
from dataclasses import field
from pathlib import Path
from typing import Any

import torch

from ftengine.core import plugins
from ftengine.core.config import LoftQConfig
from ftengine.core.config import LoRAConfig
from ftengine.core.config import RunConfig
from ftengine.core.config import dump_config
from ftengine.core.errors import ConfigError
from ftengine.core.errors import ModelError
from ftengine.core.errors import StoppedAtOnce
from ftengine.core.kernels import get_op
from ftengine.engine import distributed
from ftengine.engine import hub
from ftengine.engine import run_data
from ftengine.engine import vision
from ftengine.engine.attention import attention_note
from ftengine.engine.attention import choose_attn_implementation
from ftengine.engine.data import DataReport
from ftengine.engine.exporting import export_all
from ftengine.engine.failures import directory_bytes
from ftengine.engine.failures import disk_full
from ftengine.engine.failures import error_line
from ftengine.engine.failures import is_disk_full
from ftengine.engine.loftq import check_unquantized
from ftengine.engine.loftq import initialise as loftq_initialise
from ftengine.engine.loftq import requested as loftq_requested
from ftengine.engine.memory import checkpointing
from ftengine.engine.rope_scaling import apply_rope_scaling
from ftengine.engine.rundir import RunDir
from ftengine.engine.settings import ModelSettings
from ftengine.engine.settings import remember_settings
from ftengine.engine.training import TrainResult
from ftengine.engine.training import train

log = logging.getLogger("ftengine")


@dataclass
class LoadedModel:
    model: Any
    tokenizer: Any
    adapter: Any  # the ModelAdapter serving the model type, or None (trains unpatched)
    notes: list[str] = field(default_factory=list)
    settings: ModelSettings = field(default_factory=ModelSettings)
    processor: Any = None  # vision-language models: the processor (``tokenizer`` is its tokenizer)
    collator: Any = None  # set by the data stage when it batches rows itself (images)


# ----------------------------------------------------------------------------- load


def _is_local(name_or_path: str) -> bool:
    return Path(name_or_path).expanduser().exists() or name_or_path.startswith((".", "/", "~")) \
        or name_or_path.count("/") != 1


def resolve_dtype(dtype: str) -> torch.dtype:
    if dtype != "auto":
        return getattr(torch, dtype)
    if torch.cuda.is_available():
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def load_model_config(name_or_path: str, trust_remote_code: bool = False, revision: str | None = None) -> Any:
    """The model's Hugging Face config; a :class:`ModelError` for a missing path or unknown type."""
    from transformers import AutoConfig

    path = Path(name_or_path).expanduser()
    if _is_local(name_or_path) and not path.exists():
        raise ModelError(f"{name_or_path}: model path does not exist")
    if path.is_dir() and not (path / "config.json").exists():
        raise ModelError(f"{name_or_path}: not a Hugging Face model directory (no config.json)")
    try:
        return AutoConfig.from_pretrained(str(path) if path.exists() else name_or_path,
                                          trust_remote_code=trust_remote_code, revision=revision)
    except (ValueError, KeyError) as exc:
        if "trust_remote_code" in str(exc):
            raise ModelError(f"{name_or_path}: its code lives in the model repository (config.json auto_map); set "
                             f"model.trust_remote_code: true (trust_remote_code=True in Python) only for a "
                             f"repository you trust") from None
        model_type = _model_type_of(path)
        served = sorted(t for a in plugins.get_registry("models").values() for t in a.model_types)
        if model_type:
            raise ModelError(f"{name_or_path}: model type {model_type!r} is served by no ftengine plugin and unknown "
                             f"to transformers; served types: {', '.join(served)}") from None
        raise ModelError(f"{name_or_path}: cannot read the model config: {exc}") from None
    except OSError as exc:
        raise ModelError(f"{name_or_path}: cannot load the model config ({exc})") from None


def _model_type_of(path: Path) -> str | None:
    try:
        return json.loads((path / "config.json").read_text()).get("model_type")
    except (OSError, ValueError):
        return None


def find_adapter(hf_config: Any, adapter_name: str | None = None) -> Any:
    """The model adapter for a config (``model.adapter`` wins); ``None`` with a warning otherwise."""
    if adapter_name:
        return plugins.get("models", adapter_name)
    adapter = plugins.adapter_for_model_type(hf_config.model_type)
    if adapter is None:
        log.warning("model type %r is served by no ftengine model plugin: training it with the unpatched "
                    "Hugging Face modules", hf_config.model_type)
    return adapter


def quantization_config(load_in_4bit: bool, load_in_8bit: bool, quant: Any = None,
                        quant_storage: torch.dtype | None = None) -> Any:
    """bitsandbytes' config; ``quant_storage``: the dtype the packed 4-bit weights are stored as (a
    float dtype lets FSDP shard them with the other weights)."""
    if not (load_in_4bit or load_in_8bit):
        return None
    from transformers import BitsAndBytesConfig

    if load_in_8bit:
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=getattr(quant, "bnb_4bit_quant_type", "nf4"),
        bnb_4bit_use_double_quant=getattr(quant, "bnb_4bit_use_double_quant", True),
        bnb_4bit_compute_dtype=getattr(torch, getattr(quant, "bnb_4bit_compute_dtype", "bfloat16")),
        **({"bnb_4bit_quant_storage": quant_storage} if quant_storage is not None else {}),
    )


def _from_pretrained(source: str, kwargs: dict[str, Any], hf_config: Any, config: RunConfig,
                     vlm: bool) -> tuple[Any, Any, Any]:
    """The model, its tokenizer and (vision-language) its processor."""
    from transformers import AutoModelForCausalLM
    from transformers import AutoTokenizer

    m = config.model
    if vlm:
        from transformers import AutoModelForImageTextToText

        model = AutoModelForImageTextToText.from_pretrained(source, **kwargs)
        processor = vision.load_processor(source, hf_config, m.trust_remote_code, m.revision,
                                          config.data.max_pixels, config.data.min_pixels)
        return model, processor.tokenizer, processor
    model = AutoModelForCausalLM.from_pretrained(source, **kwargs)
    return model, AutoTokenizer.from_pretrained(source, trust_remote_code=m.trust_remote_code,
                                                revision=m.revision), None


def load(config: RunConfig, strategy: str = "single") -> LoadedModel:
    """Stage 1: the model (16-bit, 4-bit NF4 or 8-bit) and its tokenizer; for ``strategy`` fsdp the
    4-bit weights are stored in the compute dtype so they shard with the rest; with 4 bits, the adapter's
    ``quantized_load`` (if any) wraps the loading."""
    m, q = config.model, config.quantization
    hf_config = load_model_config(m.name_or_path, m.trust_remote_code, m.revision)
    rope_note = apply_rope_scaling(hf_config, m.rope_scaling.model_dump() if m.rope_scaling else None)
    adapter = find_adapter(hf_config, m.adapter)
    dtype = resolve_dtype(m.dtype)
    source = str(Path(m.name_or_path).expanduser()) if _is_local(m.name_or_path) else m.name_or_path
    attention = choose_attn_implementation(m.attn_implementation, config.data.packing, hf_config)
    kwargs: dict[str, Any] = dict(dtype=dtype, trust_remote_code=m.trust_remote_code, revision=m.revision,
                                  attn_implementation=attention)
    if rope_note is not None:
        kwargs["config"] = hf_config
    storage = getattr(torch, q.bnb_4bit_compute_dtype) if strategy == "fsdp" else None
    if not m.allow_pickle:
        kwargs["use_safetensors"] = True
    bnb = quantization_config(q.load_in_4bit, q.load_in_8bit, q, storage)
    vlm = vision.is_vision_config(hf_config)
    kept_16bit = vision.keep_unquantized(bnb, adapter) if vlm else []
    if bnb is not None:
        kwargs["quantization_config"] = bnb
    if torch.cuda.is_available():
        kwargs["device_map"] = {"": torch.cuda.current_device()}
    loading = getattr(adapter, "quantized_load", None) if q.load_in_4bit else None
    try:
        with loading(get_op) if loading is not None else contextlib.nullcontext():
            model, tokenizer, processor = _from_pretrained(source, kwargs, hf_config, config, vlm)
    except OSError as exc:
        hint = "" if m.allow_pickle else ("; only safetensors weights load unless model.allow_pickle: true (pickle "
                                          "files can run code when loaded)")
        raise ModelError(f"{m.name_or_path}: cannot load the model ({str(exc).splitlines()[0]}){hint}") from None
    # bitsandbytes repacks 4-bit weights for inference on an eval-mode forward; training needs
    # train mode from the first forward on.
    model.train()
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    mode = "4-bit NF4" if q.load_in_4bit else "8-bit" if q.load_in_8bit else str(dtype).replace("torch.", "")
    settings = ModelSettings(m.max_seq_length, m.attn_implementation, m.offload_embedding)
    remember_settings(model, settings)
    notes = [f"model {m.name_or_path} ({hf_config.model_type}, {mode}, "
             f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters)",
             attention_note(attention, m.attn_implementation, config.data.packing)]
    if rope_note is not None:
        notes.append(rope_note)
    if kept_16bit:
        notes.append("kept 16-bit (not quantized): " + ", ".join(kept_16bit))
    return LoadedModel(model, tokenizer, adapter, notes, settings, processor)


# ----------------------------------------------------------------------------- patch


def patch(loaded: LoadedModel) -> LoadedModel:
    """Stage 2: the model adapter swaps module forwards for the kernel ops."""
    if loaded.adapter is None:
        loaded.notes.append(f"patched: nothing (no adapter serves {loaded.model.config.model_type!r})")
        return loaded
    lines = loaded.adapter.patch(loaded.model, get_op)
    loaded.notes.append(f"patched by '{loaded.adapter.name}': " + ("; ".join(lines) if lines else "nothing"))
    return loaded


# ----------------------------------------------------------------------------- adapt


def target_modules(lora: LoRAConfig, adapter: Any, model: Any = None) -> Any:
    """peft's ``target_modules``: the adapter's for ``all-linear`` (a vision-language family's as the
    ``lora.finetune_*`` switches select), else the configured ones."""
    if lora.target_modules == "all-linear" and adapter is not None:
        spec = getattr(adapter, "vision", None)
        if model is not None and spec is not None and vision.is_vision_config(model.config):
            return vision.lora_targets(spec, lora)
        return list(adapter.default_target_modules)
    return lora.target_modules


def enable_gradient_checkpointing(model: Any, mode: bool | str) -> str:
    """Gradient checkpointing of the decoder layers: off, standard (non-reentrant), offload, auto."""
    try:
        return checkpointing.apply_gradient_checkpointing(model, mode)
    except ValueError:
        if mode is not True and mode != "auto":
            raise
    # A model whose decoder layers are not transformers' GradientCheckpointingLayer: its own checkpointing.
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if hasattr(model, "enable_input_require_grads"):
        model.enable_input_require_grads()
    return "standard (non-reentrant, transformers'" + ("; auto needs GradientCheckpointingLayer decoder layers)"
                                                      if mode == "auto" else ")")


MULTIMODAL_PARTS = r".*(vision_tower|vision_model|multi_modal_projector|audio_tower).*"
"""Modules of multimodal checkpoints (Gemma 3) that ``all-linear`` LoRA targets must not reach."""


def _is_multimodal(model: Any) -> bool:
    return any(re.fullmatch(MULTIMODAL_PARTS, name) for name, _ in model.named_modules())


def peft_lora_config(lora: LoRAConfig, adapter: Any, model: Any) -> tuple[Any, bool]:
    """``(peft LoraConfig, per_tower)``: the run's LoRA for ``model`` (``per_tower``: a vision-language
    model's targets chosen tower by tower)."""
    from peft import LoraConfig

    targets = target_modules(lora, adapter, model)
    per_tower = isinstance(targets, str) and lora.target_modules == "all-linear"
    return LoraConfig(
        r=lora.r, lora_alpha=lora.lora_alpha, lora_dropout=lora.lora_dropout,
        target_modules=targets,
        target_parameters=lora.target_parameters, bias=lora.bias, use_rslora=lora.use_rslora,
        use_dora=lora.use_dora,  # LoftQ: peft's default start, then ftengine's LoftQ (engine/loftq.py) in adapt
        init_lora_weights=True if lora.init_lora_weights == "loftq" else lora.init_lora_weights,
        modules_to_save=lora.modules_to_save, task_type="CAUSAL_LM",
        exclude_modules=MULTIMODAL_PARTS if lora.target_modules == "all-linear" and _is_multimodal(model)
        and not per_tower else None,
    ), per_tower


def attach_lora(model: Any, peft_config: Any) -> Any:
    """peft's ``get_peft_model``; LoRA dropout on fused mixture-of-experts weights is a :class:`ConfigError`."""
    from peft import get_peft_model

    try:
        return get_peft_model(model, peft_config)
    except ValueError as exc:
        if "lora_dropout" not in str(exc):
            raise
        raise ConfigError(f"lora.lora_dropout: {peft_config.lora_dropout} cannot apply to this "
                          f"{model.config.model_type} model's fused mixture-of-experts weights, which the LoRA "
                          "targets reach (peft adapts those 3-D parameters in place, with no dropout); set "
                          "lora.lora_dropout: 0, or leave the experts and the router out of lora.target_modules"
                          ) from None


def adapt(loaded: LoadedModel, lora: LoRAConfig, full_finetuning: bool = False,
          gradient_checkpointing: bool | str = "auto", seed: int = 3407) -> LoadedModel:
    """Stage 3: LoRA adapters attached with peft (or every weight trainable for full fine-tuning)."""
    model = loaded.model
    if full_finetuning:
        for param in model.parameters():
            param.requires_grad_(True)
        loaded.notes.append("full fine-tuning: every weight trainable")
    else:
        loftq = loftq_requested(lora)
        if loftq:
            check_unquantized(model)
        torch.manual_seed(seed)
        peft_config, per_tower = peft_lora_config(lora, loaded.adapter, model)
        model = attach_lora(model, peft_config)
        if loftq:
            settings = lora.loftq_config or LoftQConfig()
            loaded.notes.append(loftq_initialise(model, settings.loftq_bits, settings.loftq_iter))
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        targets = vision.describe_targets(lora) if per_tower else ", ".join(
            sorted(peft_config.target_modules) + list(peft_config.target_parameters or ()))
        loaded.notes.append(f"LoRA r={lora.r} alpha={lora.lora_alpha} on {targets} "
                            f"({trainable / 1e6:.3f}M trainable parameters)")
    loaded.notes.append(f"gradient checkpointing: {enable_gradient_checkpointing(model, gradient_checkpointing)}")
    if loaded.settings.offload_embedding:
        from ftengine.engine.memory.embedding_offload import offload_input_embedding

        try:
            loaded.notes.append(offload_input_embedding(model))
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
    routes = getattr(loaded.adapter, "routes", None)
    if routes is not None:
        loaded.notes.append("projections: " + "; ".join(routes(model)))
    loaded.model = model
    return loaded


# ----------------------------------------------------------------------------- a whole run


def preflight(config: RunConfig) -> list[str]:
    """Every check that needs no weights and no run directory, all problems in one error
    (:mod:`ftengine.engine.preflight`), then a Hub token for every export pushed; returns the warnings."""
    from ftengine.engine import preflight as checks

    warnings = checks.check(config)
    for i, entry in enumerate(config.export):
        repo_id = (entry.model_extra or {}).get("push_to_hub")
        if repo_id:
            hub.check_push(repo_id, None, f"export[{i}].push_to_hub")
    return warnings


def model_card_details(config: RunConfig, result: TrainResult) -> dict[str, Any]:
    """What a pushed export's model card lists: base model, data, settings, final loss."""
    return {"base model": config.model.name_or_path, "data": config.data.path, "trainer": config.training.trainer,
            "method": "full fine-tuning" if config.model.full_finetuning else
            f"LoRA r={config.lora.r} alpha={config.lora.lora_alpha}" + (" (4-bit base)"
                                                                       if config.quantization.load_in_4bit else ""),
            "steps": result.steps, "learning rate": config.training.learning_rate,
            "max_seq_length": config.model.max_seq_length,
            "final loss": None if result.last_loss is None else round(result.last_loss, 4)}


def peak_memory() -> dict[str, float]:
    import psutil

    rss = psutil.Process(os.getpid()).memory_info().rss
    try:
        import resource

        rss = max(rss, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    except ImportError:
        pass
    out = {"cpu_rss_gib": rss / 2**30}
    if torch.cuda.is_available():
        out["gpu_allocated_gib"] = torch.cuda.max_memory_allocated() / 2**30
        out["gpu_reserved_gib"] = torch.cuda.max_memory_reserved() / 2**30
    return out


@dataclass
class RunResult:
    run_dir: RunDir
    train: TrainResult
    data: DataReport
    notes: list[str]
    exports: dict[str, tuple[Path, list[str]]]
    memory: dict[str, float]
    model: Any = None
    tokenizer: Any = None
    failed_exports: dict[str, str] = field(default_factory=dict)  # format -> error line


def new_run_dir(config: RunConfig, output_dir: str | None) -> RunDir:
    name = config.output.name or Path(config.model.name_or_path.rstrip("/")).name or "run"
    return RunDir.create(output_dir or config.output.dir, name)


def load_adapted(config: RunConfig, strategy: str = "single") -> LoadedModel:
    """Stages 1-3: the model loaded, patched and adapted as ``config`` says."""
    return adapt(patch(load(config, strategy)), config.lora, config.model.full_finetuning,
                 config.training.gradient_checkpointing, config.training.seed)


def model_for_export(loaded: LoadedModel, config: RunConfig) -> Any:
    """The model the exporters read: the trained one, or, after FSDP training, an unsharded copy on
    rank 0 holding the trained weights gathered from every rank (``None`` on the other ranks)."""
    if not distributed.is_sharded(loaded.model):
        return loaded.model if distributed.is_main_process() else None
    state = distributed.gather_state_dict(loaded.model, trainable_only=not config.model.full_finetuning)
    if state is None:
        return None
    unsharded = load_adapted(config).model
    distributed.load_gathered(unsharded, state)
    return unsharded


def run(config: RunConfig, run_dir: RunDir | None = None, output_dir: str | None = None,
        resume: bool = False) -> RunResult:
    """A whole run, holding the run directory's lock. With ``resume`` the run continues in ``run_dir``
    from its latest checkpoint, or, when its training had finished, writes the exports still missing.

    Under torchrun / accelerate launch (several ranks) every rank calls it: they share rank 0's run
    directory, which only rank 0 writes (and locks), and rank 0 alone exports.

    Raises:
        FtengineError: a preflight problem (before any run directory exists), or a failure of the
            run (recorded in ``run.json`` as ``failed`` with the same line). A failed export is not
            raised: the result lists it and the status says ``exports_failed``.
    """
    preflight(config)
    rank = distributed.rank_info()
    distributed.init_process_group(rank)
    if resume:
        assert run_dir is not None
    else:
        run_dir = run_dir or distributed.broadcast_from_main(lambda: new_run_dir(config, output_dir))
    run_dir.writer = rank.is_main
    with run_dir.lock("training"):
        return _run_locked(config, run_dir, resume, rank)


def _run_locked(config: RunConfig, run_dir: RunDir, resume: bool, rank: Any) -> RunResult:
    strategy, trainer_arguments, notes = "single", {}, []
    if rank.distributed:
        if config.distributed.num_processes > 1 and config.distributed.num_processes != rank.world_size:
            raise ConfigError(f"distributed.num_processes: {config.distributed.num_processes}, but the launcher "
                              f"started {rank.world_size} processes")
        hf_config = load_model_config(config.model.name_or_path, config.model.trust_remote_code, config.model.revision)
        strategy, line = distributed.choose_strategy(config, hf_config, rank.world_size)
        notes.append(f"distributed: {line}")
    state = run_dir.status() if resume else {}
    trained = resume and training_finished(run_dir, state, config.training.max_steps)
    resume_from = None
    if resume and not trained:
        checkpoint = run_dir.latest_checkpoint()
        config, note = distributed.resume_config(config, checkpoint, rank.world_size, strategy)
        notes += [note] if note else []
        resume_from = run_dir.resume_point()
    elif not resume:
        run_dir.write_text(run_dir.config_path.name, dump_config(config))
    run_dir.set_status("running", started=time.strftime("%Y-%m-%dT%H:%M:%S"), error=None)
    train_ds = None  # the training rows: the default calibration text of exports that take one
    try:
        if trained:
            from ftengine.engine.export_source import TrainingRows

            model, tokenizer, result, report, notes = _finished_training(config, run_dir, state)
            train_ds = TrainingRows(config, tokenizer)  # read only if an export calibrates on them
            memory = peak_memory()
            exported = model if rank.is_main else None
        else:
            loaded = load_adapted(config, strategy)
            loaded.notes += notes
            if rank.distributed:
                trainer_arguments = distributed.trainer_arguments(strategy, loaded.model,
                                                                  config.distributed.fsdp_reshard_after_forward)
            train_ds, eval_ds, report = run_data.data(loaded, config)
            run_dir.write_text("data_report.json", json.dumps(report.to_dict(), indent=2) + "\n")
            result = train(loaded.model, loaded.tokenizer, train_ds, eval_ds, config.training, run_dir, resume_from,
                           settings=loaded.settings, strategy=strategy, trainer_arguments=trainer_arguments,
                           data_collator=loaded.collator)
            memory = peak_memory()
            ranks = distributed.gather_objects(memory)
            if rank.distributed:
                memory["ranks"] = ranks
            model, tokenizer, notes = loaded.model, loaded.processor or loaded.tokenizer, loaded.notes
            exported = None if result.interrupted else model_for_export(loaded, config)
    except KeyboardInterrupt:
        latest = run_dir.latest_checkpoint()
        run_dir.set_status("interrupted", error="stopped at once by a second interrupt",
                           checkpoint=str(latest) if latest else None)
        raise StoppedAtOnce(run_dir.path, latest) from None
    except BaseException as exc:
        if not is_disk_full(exc):
            run_dir.set_status("failed", error=error_line(exc))
            raise
        # A checkpoint needs about as much as the last complete one took.
        full = disk_full(exc, run_dir.path, directory_bytes(run_dir.latest_checkpoint() or run_dir.path))
        run_dir.set_status("failed", error=str(full))
        raise full from None
    distributed.leave_together()  # the ranks are done with each other; rank 0 alone exports
    summary = {"steps": result.steps, "first_loss": result.first_loss, "last_loss": result.last_loss,
               "last_eval_loss": result.eval_losses[-1][1] if result.eval_losses else None,
               "wall_seconds": round(result.wall_seconds, 2), "memory": memory, "notes": notes,
               "data": report.to_dict(), "skipped_steps": result.skipped_steps}
    if result.interrupted:
        run_dir.set_status("interrupted", summary=summary, checkpoint=result.checkpoint)
        return RunResult(run_dir, result, report, notes, {}, memory, model, tokenizer)
    run_dir.set_status("running", training="completed", summary=summary, checkpoint=result.checkpoint)
    done = {k: v for k, v in state.get("exports_done", {}).items() if Path(v).is_dir()} if trained else {}
    run_dir.set_status("running", exports_done=done)
    exports: dict[str, tuple[Path, list[str]]] = {}
    failed: dict[str, str] = {}
    if exported is not None:  # rank 0 (the only rank of a single-process run) exports
        exported.eval()
        def record(name: str, target: Path) -> None:
            recorded = run_dir.status().get("exports_done", {})
            run_dir.set_status("running", exports_done={**recorded, name: str(target)})

        exports, failed = export_all(exported, tokenizer, config.export, run_dir.exports, overwrite=True,
                                     card=model_card_details(config, result), calibration=train_ds, skip=done,
                                     keep_going=True, on_done=record)
    summary["exports"] = {**done, **{k: str(v[0]) for k, v in exports.items()}}
    run_dir.set_status("exports_failed" if failed else "completed", summary=summary, export_errors=failed)
    return RunResult(run_dir, result, report, notes, exports, memory, model, tokenizer, failed_exports=failed)


def training_finished(run_dir: RunDir, state: dict[str, Any], max_steps: int) -> bool:
    """Whether a resumed run has nothing left to train: its status says so, or (killed before it could)
    its newest complete checkpoint is the one at ``max_steps``. Resuming a trainer at its last step
    would run one step more."""
    checkpoint = run_dir.latest_checkpoint()
    if checkpoint is None:
        return False
    return state.get("training") == "completed" or 0 < max_steps <= int(checkpoint.name.split("-")[1])


def _finished_training(config: RunConfig, run_dir: RunDir, state: dict[str, Any]
                       ) -> tuple[Any, Any, TrainResult, DataReport, list[str]]:
    """A run whose training finished before: its final checkpoint loaded back, for the missing exports.
    Without a recorded summary (killed before it was written), the losses come from ``metrics.jsonl``."""
    from ftengine.engine.export_source import load_checkpoint

    checkpoint = run_dir.resume_point()  # also drops metrics logged after it
    model, tokenizer = load_checkpoint(config, checkpoint)
    summary = state.get("summary", {})
    losses = [(m["step"], m["loss"]) for m in run_dir.read_metrics() if m.get("loss") is not None]
    result = TrainResult(steps=summary.get("steps", int(checkpoint.name.split("-")[1])),
                         first_loss=summary.get("first_loss", losses[0][1] if losses else None),
                         last_loss=summary.get("last_loss", losses[-1][1] if losses else None), wall_seconds=0.0,
                         interrupted=False, checkpoint=str(checkpoint), losses=losses,
                         skipped_steps=summary.get("skipped_steps", []))
    known = DataReport.__dataclass_fields__
    report = DataReport(**{k: v for k, v in summary.get("data", {}).items() if k in known})
    notes = [*summary.get("notes", []), f"training had finished: exports from {checkpoint}"]
    return model, tokenizer, result, report, notes
