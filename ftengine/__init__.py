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

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING
from typing import Any

from ftengine.core.hookspecs import hookimpl

if TYPE_CHECKING:
    import torch

__version__ = "0.1.0"
__all__ = ["hookimpl", "load_model", "add_lora", "get_chat_template", "load_dataset", "train", "make_trainer",
           "export", "generate", "standardize_sharegpt", "conversation_extension", "to_sharegpt"]


def load_model(name_or_path: str, max_seq_length: int = 2048, dtype: str | torch.dtype | None = None,
               load_in_4bit: bool = False, load_in_8bit: bool = False, full_finetuning: bool = False,
               trust_remote_code: bool = False, attn_implementation: str = "auto",
               offload_embedding: bool = False, rope_scaling: dict[str, Any] | None = None) -> tuple[Any, Any]:
    """Load a causal LM and its tokenizer (16-bit, 4-bit NF4 or 8-bit) and patch it with the kernel ops.

    A vision-language checkpoint (Qwen2-VL, Qwen2.5-VL, Gemma 3, Llama 3.2 Vision, ...) comes with its
    processor instead of the tokenizer: the object :func:`get_chat_template`, :func:`load_dataset`,
    :func:`train`, :func:`generate` and :func:`export` take for images (its ``.tokenizer`` is the tokenizer).

    Args:
        name_or_path: local Hugging Face directory or hub id; a LoRA adapter directory (peft's, as the
            ``lora`` export writes it) loads its base model with the adapter on, as peft's
            ``AutoPeftModelForCausalLM`` does.
        max_seq_length: kept with the model (:class:`ftengine.engine.settings.ModelSettings`) for
            :func:`train`'s trainers, and as the tokenizer's ``model_max_length``, the default of
            :func:`load_dataset`.
        dtype: ``"bfloat16"``, ``"float16"``, ``"float32"`` (or the ``torch`` dtype, as transformers
            takes it) or ``None`` for the device's best.
        load_in_4bit: QLoRA base (NF4, double quantization, bf16 compute; a mixture of experts' fused expert
            weights, which bitsandbytes leaves 16-bit, are packed NF4 by ftengine when the model is patched).
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
        rope_scaling: RoPE scaling set on the config before the model is built, with transformers'
            keys (``{"rope_type": "yarn", "factor": 4.0}``; ``linear``, ``dynamic``, ``yarn``,
            ``llama3``, ``longrope``); see ``model.rope_scaling``.

    Returns:
        ``(model, tokenizer)``, or ``(model, processor)`` for a vision-language model.
    """
    from ftengine.core.config import ModelConfig
    from ftengine.core.config import QuantizationConfig
    from ftengine.core.config import RunConfig
    from ftengine.core.config import check_combinations
    from ftengine.core.config import validate_section
    from ftengine.core.errors import ConfigError
    from ftengine.engine import distributed
    from ftengine.engine import pipeline

    adapter_dir = _adapter_directory(name_or_path)
    if adapter_dir is not None:
        name_or_path = json.loads((adapter_dir / "adapter_config.json").read_text())["base_model_name_or_path"]
    model_config = validate_section(ModelConfig, dict(
        name_or_path=name_or_path, max_seq_length=max_seq_length, dtype=_dtype_name(dtype),
        full_finetuning=full_finetuning, trust_remote_code=trust_remote_code,
        attn_implementation=attn_implementation, offload_embedding=offload_embedding,
        rope_scaling=rope_scaling), "load_model")
    quant = validate_section(QuantizationConfig, dict(load_in_4bit=load_in_4bit, load_in_8bit=load_in_8bit),
                             "load_model")
    config = RunConfig(model=model_config, quantization=quant, export=[])
    problems = check_combinations(config)
    if problems:
        raise ConfigError("load_model: " + "; ".join(problems))
    # under a launcher the strategy comes with train(): a 4-bit base is stored the way fsdp can shard it
    loaded = pipeline.patch(pipeline.load(config, "fsdp" if distributed.rank_info().distributed else "single"))
    if adapter_dir is not None:
        from transformers import AutoTokenizer

        from ftengine.engine import loftq

        loaded.model = loftq.load_adapter(loaded.model, adapter_dir, is_trainable=True)
        if (adapter_dir / "tokenizer_config.json").exists():
            loaded.tokenizer = AutoTokenizer.from_pretrained(str(adapter_dir))
            if loaded.processor is not None:
                loaded.processor.tokenizer = loaded.tokenizer
    if full_finetuning:
        loaded = pipeline.adapt(loaded, config.lora, full_finetuning=True, gradient_checkpointing=False)
    loaded.tokenizer.model_max_length = max_seq_length  # load_dataset's default truncation length
    return loaded.model, loaded.processor or loaded.tokenizer


def _dtype_name(dtype: Any) -> Any:
    """``torch.bfloat16`` -> ``"bfloat16"``; ``None`` -> ``"auto"``; anything else as given (validated later)."""
    if dtype is None:
        return "auto"
    import torch

    return str(dtype).removeprefix("torch.") if isinstance(dtype, torch.dtype) else dtype


def _adapter_directory(name_or_path: str) -> Path | None:
    path = Path(name_or_path).expanduser()
    return path if (path / "adapter_config.json").exists() and not (path / "config.json").exists() else None


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
            ``target_parameters`` (peft's: fused mixture-of-experts weights by parameter name),
            ``loftq_config`` (with ``init_lora_weights="loftq"``: peft's ``LoftQConfig`` or a dict of
            ``loftq_bits``, ``loftq_iter``; the base must be unquantized).
    """
    from ftengine.core.config import LoRAConfig
    from ftengine.core.config import TrainingConfig
    from ftengine.core.config import validate_section
    from ftengine.engine import loftq
    from ftengine.engine import pipeline
    from ftengine.engine.settings import settings_of

    if lora_kwargs.get("loftq_config") is not None:
        lora_kwargs["loftq_config"] = loftq.as_dict(lora_kwargs["loftq_config"])

    lora = validate_section(LoRAConfig, dict(r=r, lora_alpha=lora_alpha, lora_dropout=lora_dropout,
                                             target_modules=target_modules, **lora_kwargs), "add_lora")
    validate_section(TrainingConfig, {"gradient_checkpointing": use_gradient_checkpointing}, "add_lora")
    adapter = pipeline.find_adapter(model.config)
    loaded = pipeline.adapt(pipeline.LoadedModel(model, None, adapter, settings=settings_of(model)), lora,
                            False, use_gradient_checkpointing, random_state)
    return loaded.model


def get_chat_template(tokenizer: Any, chat_template: str = "chatml") -> Any:
    """Put a registered chat template (``chatml``, ``qwen2.5``, ``llama-3.1``, ... or ``tokenizer``)
    on the tokenizer, with the BOS/EOS/pad tokens it needs (on a processor: on its tokenizer and itself)."""
    from ftengine.engine.templates import apply_chat_template
    from ftengine.engine.vision_api import is_processor

    if is_processor(tokenizer):
        apply_chat_template(tokenizer.tokenizer, chat_template)
        tokenizer.chat_template = tokenizer.tokenizer.chat_template or tokenizer.chat_template
        return tokenizer
    return apply_chat_template(tokenizer, chat_template)


def load_dataset(data: Any, tokenizer: Any, format: str = "auto", max_seq_length: int | None = None,
                 trainer: str = "sft", **data_kwargs: Any) -> Any:
    """Read, convert and tokenize a dataset with labels masked to the trained tokens.

    Args:
        data: a .jsonl/.json/.parquet/.csv file, a directory or glob of them, a hub dataset id, or the
            rows themselves: a ``datasets.Dataset``, a pandas ``DataFrame`` or a list of dicts.
        tokenizer: the tokenizer (with its chat template, see :func:`get_chat_template`), or a vision-language
            model's processor: conversations with images, batched per step by the processor (rows too long
            with their image tokens are bad rows, not truncated).
        format: a registered format name or ``"auto"``.
        max_seq_length: truncation length; default: the ``max_seq_length`` given to :func:`load_model`
            (kept as the tokenizer's ``model_max_length``), else 2048.
        trainer: the trainer the data is for (``sft`` tokenizes with masked labels; ``dpo`` gives
            conversational prompt/chosen/rejected rows).
        **data_kwargs: other ``data:`` config keys (``columns``, ``train_on``, ``on_bad_rows``, ...).

    Returns:
        A ``datasets.Dataset``; its ``ftengine_report`` attribute holds the :class:`DataReport` (with a
        processor: a dataset of row numbers, the rows with their images on it, for :func:`train`).
    """
    from ftengine.core import plugins
    from ftengine.core.config import DataConfig
    from ftengine.core.config import validate_section
    from ftengine.engine import run_data
    from ftengine.engine import vision_api
    from ftengine.engine.data import DataReport

    path = data if isinstance(data, (str, Path)) else None
    config = validate_section(DataConfig, dict(path=str(path) if path else None, format=format, **data_kwargs),
                              "load_dataset")
    if config.format != "auto":
        plugins.get("formats", config.format)
    if run_data.needs_chat_template(data, config) or vision_api.is_processor(tokenizer):
        if getattr(tokenizer, "chat_template", None) is None:
            get_chat_template(tokenizer, config.chat_template or "chatml")
        elif config.chat_template:
            get_chat_template(tokenizer, config.chat_template)
    if max_seq_length is None:
        limit = getattr(tokenizer, "model_max_length", None)
        max_seq_length = limit if isinstance(limit, int) and 0 < limit < 10**7 else 2048
    report = DataReport()
    kinds = plugins.get("trainers", trainer).sample_kinds
    if vision_api.is_processor(tokenizer):
        dataset = vision_api.vision_dataset(data, tokenizer, config, max_seq_length, report, kinds)
    else:
        dataset = run_data.to_dataset(run_data.prepare_dataset(data, tokenizer, config, max_seq_length, kinds,
                                                               report))
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
        A :class:`ftengine.engine.training.TrainResult`.
    """
    from ftengine.core import plugins
    from ftengine.core.config import RunConfig
    from ftengine.core.errors import ConfigError
    from ftengine.engine import distributed
    from ftengine.engine import pipeline
    from ftengine.engine import preflight
    from ftengine.engine.attention import attention_for_rows
    from ftengine.engine.rundir import RunDir

    training = _training_section(trainer, training_kwargs, "train")
    plugins.get("trainers", trainer)  # an unknown name fails before any run directory exists
    problems = preflight.trainer_argument_problems(RunConfig(model={"name_or_path": "-"}, training=training))
    if problems:
        raise ConfigError("train: " + "; ".join(problems))
    dataset, eval_dataset, tokenizer, collator = _prepared_pair(dataset, eval_dataset, tokenizer, trainer)
    attention_for_rows(model, "position_ids" in getattr(dataset, "column_names", ()))
    rank = distributed.rank_info()
    distributed.init_process_group(rank)
    if output_dir is None:
        run_dir = distributed.broadcast_from_main(lambda: RunDir.create("runs", "api"))
    else:
        run_dir = RunDir(Path(output_dir))
        run_dir.path.mkdir(parents=True, exist_ok=True)
    run_dir.writer = rank.is_main
    with run_dir.lock("training"):
        resume_from = run_dir.resume_point() if resume else None
        arguments = distributed.api_trainer_arguments(strategy, model) if rank.distributed else None
        return pipeline.train(model, tokenizer, dataset, eval_dataset, training, run_dir, resume_from,
                              strategy=strategy if rank.distributed else "single", trainer_arguments=arguments,
                              data_collator=collator)


def make_trainer(model: Any, tokenizer: Any, dataset: Any, trainer: str = "sft", eval_dataset: Any = None,
                 output_dir: str = "outputs", callbacks: list[Any] | None = None, ref_model: Any = None,
                 max_seq_length: int | None = None, **training_kwargs: Any) -> Any:
    """The registered trainer's object (trl's ``SFTTrainer``, ``DPOTrainer``, ...) set up as :func:`train` sets
    it up (fused loss, ftengine's checkpointing and precision, the non-finite guard: ``.train()`` raises
    ``NonFiniteError`` on a NaN / inf loss, gradient or weight, per ``on_nonfinite``), for a caller that runs
    ``.train()`` itself.

    Args:
        dataset: rows from :func:`load_dataset`, or untokenized rows (tokenized here).
        output_dir: where the trainer writes its checkpoints.
        callbacks: extra ``transformers.TrainerCallback`` objects.
        ref_model: the DPO reference model (default: the adapter disabled, or a frozen copy).
        max_seq_length: the trainer's longest row (default: :func:`load_model`'s).
        **training_kwargs: ``training:`` config keys.
    """
    from ftengine.engine.attention import attention_for_rows
    from ftengine.engine.guard import guard_trainer
    from ftengine.engine.settings import settings_of
    from ftengine.engine.training import create_trainer

    training = _training_section(trainer, training_kwargs, "make_trainer")
    dataset, eval_dataset, tokenizer, collator = _prepared_pair(dataset, eval_dataset, tokenizer, trainer)
    attention_for_rows(model, "position_ids" in getattr(dataset, "column_names", ()))
    made = create_trainer(model, tokenizer, dataset, eval_dataset, training, Path(output_dir), list(callbacks or []),
                          ref_model=ref_model, max_seq_length=max_seq_length or settings_of(model).max_seq_length,
                          data_collator=collator)
    guard_trainer(made, training.on_nonfinite, training.max_nonfinite_steps)
    return made


def _training_section(trainer: str, kwargs: dict[str, Any], where: str) -> Any:
    """The ``training`` section of a Python API call: ``training:`` keys as they are, every other keyword a
    trainer option (``beta=0.1`` for dpo), as ``training.trainer_options`` holds them in a config."""
    from ftengine.core.config import TrainingConfig
    from ftengine.core.config import validate_section

    kwargs = dict(kwargs)
    options = {k: kwargs.pop(k) for k in list(kwargs) if k not in TrainingConfig.model_fields}
    options = {**kwargs.pop("trainer_options", {}), **options}
    return validate_section(TrainingConfig, dict(trainer=trainer, trainer_options=options, **kwargs), where)


def _prepared_pair(dataset: Any, eval_dataset: Any, tokenizer: Any, trainer: str) -> tuple[Any, Any, Any, Any]:
    """``(dataset, eval_dataset, tokenizer, collator)`` for the trainer: with a vision-language model's processor
    both sets from :func:`load_dataset` (raw rows loaded here) under one image collator and the processor's
    tokenizer; else each set :func:`_prepared` and no collator of ours."""
    from ftengine.engine import vision_api

    if not vision_api.is_processor(tokenizer):
        eval_dataset = _prepared(eval_dataset, tokenizer, trainer) if eval_dataset is not None else None
        return _prepared(dataset, tokenizer, trainer), eval_dataset, tokenizer, None
    sets = [d if d is None or "row" in (getattr(d, "column_names", None) or ())
            else load_dataset(d, tokenizer, trainer=trainer) for d in (dataset, eval_dataset)]
    train_ds, eval_ds, collator = vision_api.collated(tokenizer, *sets)
    return train_ds, eval_ds, tokenizer.tokenizer, collator


def _prepared(dataset: Any, tokenizer: Any, trainer: str) -> Any:
    """``dataset`` as the trainer takes it: what :func:`load_dataset` returned (its ``ftengine_report`` set) as it
    is; rows not yet tokenized (text, messages, ...) go through :func:`load_dataset`; other preference and
    prompt rows are always converted (conversational pairs convert to themselves). Tokenized rows without
    ``labels`` train on every token, as trl's and transformers' language-modelling collators do."""
    from ftengine.core import plugins

    if getattr(dataset, "ftengine_report", None) is not None:
        return dataset
    columns = getattr(dataset, "column_names", None)
    if "preference" not in plugins.get("trainers", trainer).sample_kinds and columns and "input_ids" in columns:
        if "labels" not in columns:
            return dataset.map(lambda row: {"labels": list(row["input_ids"])})
        return dataset
    return load_dataset(dataset, tokenizer, trainer=trainer)


def export(model: Any, tokenizer: Any, output_dir: str, format: str = "lora", overwrite: bool = False,
           calibration: Any = None, **options: Any) -> Path:
    """Export with a registered exporter (``lora``, ``merged``, ``gguf``, ...) into ``output_dir``,
    written atomically. ``options`` are the exporter's (e.g. ``quantization="q4_k_m"``, ``imatrix=True`` or
    a llama.cpp imatrix path); ``calibration`` feeds ``imatrix=True``: training rows (a dataset or list of
    dicts with ``input_ids`` or text), or a calibration file's path as ``ftengine export --calibration-data``
    takes it (then ``imatrix`` defaults to true)."""
    from ftengine.core.config import validate_exports
    from ftengine.engine import distributed
    from ftengine.engine.exporting import export_one

    if isinstance(calibration, (str, os.PathLike)):
        options = {"imatrix": True, **options, "imatrix_data": str(calibration)}
        calibration = None
    (entry,) = validate_exports([{"format": format, **options}], source="export")
    target = Path(output_dir)
    if not distributed.exports_here(model):  # another rank of a data-parallel job: rank 0 writes it
        return target
    was_training = getattr(model, "training", False)
    model.eval()
    try:
        export_one(model, tokenizer, entry, target, overwrite=overwrite, calibration=calibration)
    finally:
        model.train(was_training)
    return target


def generate(model: Any, tokenizer: Any, messages: str | list[Any], stream: bool = False, max_new_tokens: int = 256,
             temperature: float = 0.7, top_p: float = 1.0, min_p: float = 0.0,
             system: str | None = None) -> str | list[str] | Iterator[str]:
    """Answer with the model (KV cache on, the patched forward, eval mode for the call).

    Args:
        tokenizer: the tokenizer, or a vision-language model's processor: the conversations' content parts
            may then hold images (``{"type": "image", "image": path | PIL image}``).
        messages: a prompt string, one conversation (a list of ``{"role", "content"}`` dicts), or a list of
            prompts / conversations generated as one left-padded batch.
        stream: yield the answer's text piece by piece (one prompt or conversation only).
        temperature: 0 for greedy decoding; ``top_p`` and ``min_p`` filter the sampled tokens.
        system: a system message put first where the conversation has none.

    Returns:
        The answer; a list of answers for a batch; an iterator of text pieces with ``stream``.
    """
    from ftengine.engine import generation

    sampling = generation.Sampling(max_new_tokens, temperature, top_p, min_p)
    backend = generation.chat_backend(model, tokenizer)
    batch = isinstance(messages, list) and bool(messages) and not isinstance(messages[0], dict)
    if batch:
        if stream:
            raise ValueError("generate: stream=True takes one prompt or conversation, not a batch")
        return backend.batch([generation.as_conversation(m, system) for m in messages], sampling)
    conversation = generation.as_conversation(messages, system)
    if stream:
        return backend.stream(conversation, sampling)
    return backend.batch([conversation], sampling)[0]


def standardize_sharegpt(data: Any, column: str = "messages") -> Any:
    """ShareGPT rows (``conversations`` with from/value) as OpenAI role/content rows under ``column``
    (``"conversations"`` keeps the name); a list of dicts or a ``datasets.Dataset`` in, the same kind out."""
    from ftengine.engine.conversations import standardize_sharegpt as standardize

    return standardize(data, column)


def to_sharegpt(data: Any, merged_prompt: str, output_column_name: str, conversation_extension: int = 1,
                seed: int = 3407) -> Any:
    """Rows of any columns as ShareGPT conversations: ``merged_prompt`` (``{column}`` fields, ``[[optional
    parts]]``) as the human turn, ``output_column_name`` as the answer; ``conversation_extension`` rows per
    conversation."""
    from ftengine.engine.conversations import to_sharegpt as convert

    return convert(data, merged_prompt, output_column_name, conversation_extension, seed)


def conversation_extension(data: Any, n: int, seed: int = 3407) -> Any:
    """Stitch ``n`` random single-turn rows into each multi-turn conversation (deterministic for a seed)."""
    from ftengine.engine.conversations import conversation_extension as extend

    return extend(data, n, seed)
