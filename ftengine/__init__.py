"""ftengine: fine-tune open LLMs faster and in less memory.

The Python API: thin functions over the same pipeline stages ``ftengine run`` uses::

    model, tokenizer = ftengine.load_model("Qwen/Qwen2.5-0.5B-Instruct", max_seq_length=2048)
    model = ftengine.add_lora(model, r=16, lora_alpha=16)
    tokenizer = ftengine.get_chat_template(tokenizer, "qwen2.5")
    dataset = ftengine.load_dataset("data.jsonl", tokenizer=tokenizer)
    result = ftengine.train(model, tokenizer, dataset, max_steps=60, learning_rate=2e-4)
    ftengine.export(model, tokenizer, "out/", format="merged")
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING
from typing import Any

from ftengine.core.hookspecs import hookimpl

if TYPE_CHECKING:
    import torch

__version__ = "0.1.0"
__all__ = ["hookimpl", "load_model", "add_lora", "get_chat_template", "load_dataset", "train", "export",
           "standardize_sharegpt", "conversation_extension"]


def load_model(name_or_path: str, max_seq_length: int = 2048, dtype: str | torch.dtype | None = None,
               load_in_4bit: bool = False, load_in_8bit: bool = False, full_finetuning: bool = False,
               trust_remote_code: bool = False, attn_implementation: str = "auto",
               offload_embedding: bool = False) -> tuple[Any, Any]:
    """Load a causal LM and its tokenizer (16-bit, 4-bit NF4 or 8-bit) and patch it with the kernel ops.

    Args:
        name_or_path: local Hugging Face directory or hub id.
        max_seq_length: kept with the model (:class:`ftengine.engine.pipeline.ModelSettings`) for
            :func:`train`'s trainers.
        dtype: ``"bfloat16"``, ``"float16"``, ``"float32"`` (or the ``torch`` dtype, as transformers
            takes it) or ``None`` for the device's best.
        load_in_4bit: QLoRA base (NF4, double quantization, bf16 compute).
        load_in_8bit: LLM.int8 base.
        full_finetuning: make every weight trainable (no LoRA).
        trust_remote_code: allow hub model code.
        attn_implementation: ``"auto"``, ``"sdpa"``, ``"flex_attention"`` or ``"eager"`` (Hugging Face's
            names). ``"auto"`` loads sdpa (eager for models without it); :func:`train` switches it to
            flex_attention when the dataset is packed and a CUDA GPU is present.
        offload_embedding: keep the frozen input-embedding table in CPU memory mapped for the
            GPU, which reads only the rows it needs (about 1 GiB of GPU memory saved for 8B
            models); applied by :func:`add_lora` once the table is frozen. Not for tied or
            trained embeddings.

    Returns:
        ``(model, tokenizer)``.
    """
    from ftengine.core.config import ModelConfig
    from ftengine.core.config import QuantizationConfig
    from ftengine.core.config import RunConfig
    from ftengine.core.config import check_combinations
    from ftengine.core.config import validate_section
    from ftengine.core.errors import ConfigError
    from ftengine.engine import pipeline

    model_config = validate_section(ModelConfig, dict(
        name_or_path=name_or_path, max_seq_length=max_seq_length, dtype=_dtype_name(dtype),
        full_finetuning=full_finetuning, trust_remote_code=trust_remote_code,
        attn_implementation=attn_implementation, offload_embedding=offload_embedding), "load_model")
    quant = validate_section(QuantizationConfig, dict(load_in_4bit=load_in_4bit, load_in_8bit=load_in_8bit),
                             "load_model")
    config = RunConfig(model=model_config, quantization=quant, export=[])
    problems = check_combinations(config)
    if problems:
        raise ConfigError("load_model: " + "; ".join(problems))
    loaded = pipeline.patch(pipeline.load(config))
    if full_finetuning:
        loaded = pipeline.adapt(loaded, config.lora, full_finetuning=True, gradient_checkpointing=False)
    return loaded.model, loaded.tokenizer


def _dtype_name(dtype: Any) -> Any:
    """``torch.bfloat16`` -> ``"bfloat16"``; ``None`` -> ``"auto"``; anything else as given (validated later)."""
    if dtype is None:
        return "auto"
    import torch

    return str(dtype).removeprefix("torch.") if isinstance(dtype, torch.dtype) else dtype


def add_lora(model: Any, r: int = 16, lora_alpha: float = 16, lora_dropout: float = 0.0,
             target_modules: str | list[str] = "all-linear", use_gradient_checkpointing: bool | str = "auto",
             random_state: int = 3407, **lora_kwargs: Any) -> Any:
    """Attach LoRA adapters (peft) and set gradient checkpointing.

    Args:
        r, lora_alpha, lora_dropout, target_modules: as in peft's ``LoraConfig``; ``"all-linear"``
            means the architecture's projections.
        use_gradient_checkpointing: ``"auto"`` (checkpoint only the layers that would not fit), ``True``,
            ``"offload"`` or ``False``.
        random_state: seed of the adapter initialisation.
        **lora_kwargs: ``bias``, ``use_rslora``, ``use_dora``, ``init_lora_weights``, ``modules_to_save``,
            ``target_parameters`` (peft's: fused mixture-of-experts weights by parameter name).
    """
    from ftengine.core.config import LoRAConfig
    from ftengine.core.config import TrainingConfig
    from ftengine.core.config import validate_section
    from ftengine.engine import pipeline

    lora = validate_section(LoRAConfig, dict(r=r, lora_alpha=lora_alpha, lora_dropout=lora_dropout,
                                             target_modules=target_modules, **lora_kwargs), "add_lora")
    validate_section(TrainingConfig, {"gradient_checkpointing": use_gradient_checkpointing}, "add_lora")
    adapter = pipeline.find_adapter(model.config)
    loaded = pipeline.adapt(pipeline.LoadedModel(model, None, adapter, settings=pipeline.settings_of(model)), lora,
                            False, use_gradient_checkpointing, random_state)
    return loaded.model


def get_chat_template(tokenizer: Any, chat_template: str = "chatml") -> Any:
    """Put a registered chat template (``chatml``, ``qwen2.5``, ``llama-3.1``, ... or ``tokenizer``)
    on the tokenizer, with the BOS/EOS/pad tokens it needs."""
    from ftengine.engine.templates import apply_chat_template

    return apply_chat_template(tokenizer, chat_template)


def load_dataset(path: str, tokenizer: Any, format: str = "auto", max_seq_length: int = 2048,
                 trainer: str = "sft", **data_kwargs: Any) -> Any:
    """Read, convert and tokenize a dataset with labels masked to the trained tokens.

    Args:
        path: a .jsonl/.json/.parquet/.csv file, a directory or glob of them, or a hub dataset id.
        tokenizer: the tokenizer (with its chat template, see :func:`get_chat_template`).
        format: a registered format name or ``"auto"``.
        max_seq_length: truncation length.
        trainer: the trainer the data is for (``sft`` tokenizes with masked labels; ``dpo`` gives
            conversational prompt/chosen/rejected rows).
        **data_kwargs: other ``data:`` config keys (``columns``, ``train_on``, ``on_bad_rows``, ...).

    Returns:
        A ``datasets.Dataset``; its ``ftengine_report`` attribute holds the :class:`DataReport`.
    """
    from ftengine.core import plugins
    from ftengine.core.config import DataConfig
    from ftengine.core.config import validate_section
    from ftengine.engine import pipeline
    from ftengine.engine.data import DataReport

    data = validate_section(DataConfig, dict(path=path, format=format, **data_kwargs), "load_dataset")
    if data.format != "auto":
        plugins.get("formats", data.format)
    if getattr(tokenizer, "chat_template", None) is None:
        get_chat_template(tokenizer, data.chat_template or "chatml")
    elif data.chat_template:
        get_chat_template(tokenizer, data.chat_template)
    report = DataReport()
    kinds = plugins.get("trainers", trainer).sample_kinds
    rows = pipeline.prepare_dataset(path, tokenizer, data, max_seq_length, kinds, report)
    dataset = pipeline.to_dataset(rows)
    dataset.ftengine_report = report
    return dataset


def train(model: Any, tokenizer: Any, dataset: Any, trainer: str = "sft", eval_dataset: Any = None,
          output_dir: str | None = None, resume: bool = False, strategy: str = "ddp", **training_kwargs: Any) -> Any:
    """Train with a registered trainer; checkpoints, ``metrics.jsonl`` and ``loss.png`` go to a run directory.

    A model loaded with ``attn_implementation="auto"`` trains packed rows with flex_attention on a CUDA GPU.
    Under ``torchrun`` / ``accelerate launch`` every process calls it with its own copy of the model:
    they share rank 0's run directory and train data-parallel with ``strategy`` (``ddp``, or ``fsdp``
    on GPUs).

    Args:
        trainer: ``sft``, ``dpo``, ``orpo``, ``kto``, ``grpo``, ...
        output_dir: the run directory (default: a new ``runs/api-<timestamp>``).
        resume: continue from the latest checkpoint in ``output_dir``.
        strategy: with several processes: ``ddp`` or ``fsdp`` (``distributed.strategy``).
        **training_kwargs: ``training:`` config keys (``max_steps``, ``learning_rate``, ...) and the
            trainer's own options (``beta=0.1``; for ``grpo`` ``reward_funcs=[...]`` takes names,
            ``module:function`` strings or any callables).

    Returns:
        A :class:`ftengine.engine.pipeline.TrainResult`.
    """
    from ftengine.core.config import TrainingConfig
    from ftengine.core.config import validate_section
    from ftengine.engine import distributed
    from ftengine.engine import pipeline
    from ftengine.engine.rundir import RunDir

    options = {k: training_kwargs.pop(k) for k in list(training_kwargs) if k not in TrainingConfig.model_fields}
    options = {**training_kwargs.pop("trainer_options", {}), **options}
    training = validate_section(TrainingConfig, dict(trainer=trainer, trainer_options=options, **training_kwargs),
                                "train")
    pipeline.attention_for_rows(model, "position_ids" in getattr(dataset, "column_names", ()))
    rank = distributed.rank_info()
    distributed.init_process_group(rank)
    if output_dir is None:
        run_dir = distributed.broadcast_from_main(lambda: RunDir.create("runs", "api"))
    else:
        run_dir = RunDir(Path(output_dir))
        run_dir.path.mkdir(parents=True, exist_ok=True)
    run_dir.writer = rank.is_main
    resume_from = run_dir.resume_point() if resume else None
    arguments = distributed.api_trainer_arguments(strategy, model) if rank.distributed else None
    return pipeline.train(model, tokenizer, dataset, eval_dataset, training, run_dir, resume_from,
                          strategy=strategy if rank.distributed else "single", trainer_arguments=arguments)


def export(model: Any, tokenizer: Any, output_dir: str, format: str = "lora", overwrite: bool = False,
           **options: Any) -> Path:
    """Export with a registered exporter (``lora``, ``merged``, ``gguf``, ...) into ``output_dir``,
    written atomically. ``options`` are the exporter's (e.g. ``quantization="q4_k_m"``)."""
    from ftengine.core.config import validate_exports
    from ftengine.engine import distributed
    from ftengine.engine.pipeline import export_one

    (entry,) = validate_exports([{"format": format, **options}], source="export")
    target = Path(output_dir)
    if not distributed.exports_here(model):  # another rank of a data-parallel job: rank 0 writes it
        return target
    was_training = getattr(model, "training", False)
    model.eval()
    try:
        export_one(model, tokenizer, entry, target, overwrite)
    finally:
        model.train(was_training)
    return target


def standardize_sharegpt(data: Any) -> Any:
    """ShareGPT rows (``conversations`` with from/value) as OpenAI ``messages`` rows; a list of dicts or
    a ``datasets.Dataset`` in, the same kind out."""
    from ftengine.engine.conversations import standardize_sharegpt as standardize

    return standardize(data)


def conversation_extension(data: Any, n: int, seed: int = 3407) -> Any:
    """Stitch ``n`` random single-turn rows into each multi-turn conversation (deterministic for a seed)."""
    from ftengine.engine.conversations import conversation_extension as extend

    return extend(data, n, seed)
