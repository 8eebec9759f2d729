"""Training on several processes, one per GPU, with PyTorch's own DDP and FSDP2.

The processes come from ``torchrun`` or ``accelerate launch`` (which set ``RANK``, ``LOCAL_RANK`` and
``WORLD_SIZE``), or from ``ftengine run --gpus N``, which launches them itself through
``torch.distributed``'s elastic launcher (what ``torchrun`` runs). The trainer's accelerate does the
data parallelism: each rank reads its own shard of every global batch, and under ``ddp`` the
gradients of the trained weights are all-reduced; under ``fsdp`` accelerate applies FSDP2's
``fully_shard`` to every decoder layer and the root, with a mixed-precision policy from the
trainer's bf16/fp16 flag, and checkpoints are sharded (``torch.distributed.checkpoint``).

This module holds what the engine adds around that: which rank this is, the process group set up
before the model loads (so the run directory's name can be agreed on), the strategy's choice and
checks, stopping every rank at the same step, gathering the weights to rank 0 for the exports,
and the launcher.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ftengine.core.errors import ConfigError
from ftengine.core.errors import FtengineError
from ftengine.core.kernels import NF4_EXPERTS_ATTR

ENV_RUN_DIR = "FTENGINE_RUN_DIR"
"""Set by :func:`launch` for its processes: the run directory it created (so all ranks agree on it)."""
ENV_LAUNCHED = "FTENGINE_LAUNCHED"
"""Set by :func:`launch`: the launcher reports a rank's error, so the rank does not print it too."""
CHECKPOINT_INFO = "ftengine_distributed.json"
"""Written into every checkpoint: the number of processes and the strategy that wrote it."""


@dataclass(frozen=True)
class RankInfo:
    """This process's place in the job (from the launcher's environment)."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    launched: bool = False  # started by torchrun / accelerate launch, even as its only process

    @property
    def distributed(self) -> bool:
        """Several processes, or one that a launcher started: a ``torchrun --nproc-per-node 1`` job
        trains with the configured strategy too (what a one-GPU check of ddp / fsdp needs)."""
        return self.world_size > 1 or self.launched

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def rank_info() -> RankInfo:
    """The rank, local rank and world size torchrun / accelerate launch set (one process: 0, 0, 1)."""
    env = os.environ
    return RankInfo(int(env.get("RANK", 0)), int(env.get("LOCAL_RANK", 0)), int(env.get("WORLD_SIZE", 1)),
                    launched="TORCHELASTIC_RUN_ID" in env and "MASTER_ADDR" in env)


def is_main_process() -> bool:
    return rank_info().is_main


def visible_gpus() -> int:
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def backend() -> str:
    """``nccl`` between GPUs, ``gloo`` between CPU processes."""
    return "nccl" if torch.cuda.is_available() else "gloo"


def init_process_group(info: RankInfo) -> None:
    """Join the job's process group (accelerate, later, finds it initialized and uses it).

    Raises:
        FtengineError: NCCL missing from this PyTorch build on a GPU host.
    """
    import torch.distributed as dist

    if not info.distributed or dist.is_initialized():
        return
    check_backend()
    if torch.cuda.is_available():
        torch.cuda.set_device(info.local_rank)
    dist.init_process_group(backend=backend())


def check_backend() -> None:
    """One clear line, before anything starts, when the processes could not talk to each other."""
    import torch.distributed as dist

    if not dist.is_available():
        raise FtengineError("distributed training: this PyTorch build has no torch.distributed")
    if torch.cuda.is_available() and not dist.is_nccl_available():
        raise FtengineError("distributed training on GPUs needs NCCL, which this PyTorch build lacks; install a "
                            "CUDA build of PyTorch with NCCL (pip install torch --index-url .../whl/cuXXX)")
    if not torch.cuda.is_available() and not dist.is_gloo_available():
        raise FtengineError("distributed training on the CPU needs gloo, which this PyTorch build lacks")


def shutdown() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def leave_together() -> None:
    """Every rank leaves the process group at once, once all are done with it: a rank tearing it down while
    another still holds its connections can abort that one (gloo: "terminate called without an active
    exception"). A run calls it after training and before rank 0's exports, which need no other rank:
    waiting for those instead could outlast the collectives' timeout."""
    if _initialized():
        barrier()
        shutdown()


def _initialized() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()


def broadcast_from_main(make: Callable[[], Any]) -> Any:
    """``make()`` on rank 0, its (picklable) result on every rank."""
    if not _initialized():
        return make()
    import torch.distributed as dist

    box = [make() if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather_objects(obj: Any) -> list[Any]:
    """Every rank's ``obj``, in rank order, on every rank (``[obj]`` in one process)."""
    if not _initialized():
        return [obj]
    import torch.distributed as dist

    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def any_rank(flag: bool) -> bool:
    """True on every rank if it is true on any (each rank must call it at the same point)."""
    if not _initialized():
        return flag
    import torch.distributed as dist

    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
    value = torch.tensor([1 if flag else 0], dtype=torch.int32, device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


def barrier() -> None:
    if _initialized():
        import torch.distributed as dist

        dist.barrier()


# ----------------------------------------------------------------------------- the strategy


@dataclass
class MemoryPlan:
    """Bytes per device of the model's training state (weights, gradients, optimizer state), without
    activations (gradient checkpointing ``auto`` fits those to what is left)."""

    parameters: int
    trainable: int
    replicated_bytes: int  # every rank holds all of it (ddp)
    sharded_bytes: int  # each rank holds 1/world of it (fsdp)
    world_size: int

    def lines(self) -> list[str]:
        gib = 2**30
        return [f"{self.parameters / 1e9:.2f}B parameters, {self.trainable / 1e6:.1f}M trained",
                f"ddp: {self.replicated_bytes / gib:.1f} GiB per device; fsdp over {self.world_size}: "
                f"{self.sharded_bytes / gib:.1f} GiB per device (weights, gradients, optimizer state)"]


def weight_bytes_per_parameter(dtype_bytes: int, load_in_4bit: bool, load_in_8bit: bool) -> float:
    """Stored bytes of one frozen base weight: NF4 is half a byte plus a block scale per 64 values
    (double quantization keeps those at ~one byte per 256 values)."""
    if load_in_4bit:
        return 0.5 + 1 / 256 + 4 / (64 * 256)
    if load_in_8bit:
        return 1 + 4 / 4096
    return dtype_bytes


def memory_plan(parameters: int, trainable: int, dtype_bytes: int, world_size: int, load_in_4bit: bool = False,
                load_in_8bit: bool = False, full_finetuning: bool = False) -> MemoryPlan:
    """The training state's bytes per device under ddp and under fsdp.

    A trained weight costs its value, its gradient and AdamW's two moments in the model's dtype
    (``4 * dtype_bytes``); LoRA weights are kept in fp32 by peft (16 bytes). A frozen weight costs
    its stored bytes only.

    Args:
        parameters: the base model's parameters.
        trainable: the trained ones: LoRA's (added to the base), or ``parameters`` in full fine-tuning.
    """
    frozen = 0 if full_finetuning else parameters
    per_trained = 4 * dtype_bytes if full_finetuning else 16
    total = int(frozen * weight_bytes_per_parameter(dtype_bytes, load_in_4bit, load_in_8bit)
                + trainable * per_trained)
    return MemoryPlan(parameters, trainable, total, -(-total // world_size), world_size)


def count_parameters(hf_config: Any) -> int:
    """Parameters of the model ``hf_config`` describes, counted on the meta device (nothing allocated)."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(hf_config)
    return sum(p.numel() for p in model.parameters())  # a tied embedding counts once


def lora_parameters(hf_config: Any, r: int) -> int:
    """LoRA weights on every linear layer of the decoder (q, k, v, o, gate, up, down): ``r * (in + out)``."""
    text = getattr(hf_config, "text_config", None) or hf_config
    hidden, inter = text.hidden_size, text.intermediate_size
    heads = text.num_attention_heads
    head_dim = getattr(text, "head_dim", None) or hidden // heads
    kv = getattr(text, "num_key_value_heads", None) or heads
    q, k = heads * head_dim, kv * head_dim
    per_layer = r * ((hidden + q) + 2 * (hidden + k) + (q + hidden) + 2 * (hidden + inter) + (inter + hidden))
    return per_layer * text.num_hidden_layers


def device_bytes() -> int:
    """Memory of one device: the first GPU's, else this host's available memory."""
    if torch.cuda.is_available():
        return torch.cuda.get_device_properties(0).total_memory
    import psutil

    return psutil.virtual_memory().available


def choose_strategy(config: Any, hf_config: Any, world_size: int, memory: int | None = None,
                    on_gpu: bool | None = None) -> tuple[str, str]:
    """The strategy a run uses and a line saying why.

    ``auto`` is ddp when the training state (:func:`memory_plan`) takes at most 60% of a GPU (what
    is left is for activations), else fsdp; ddp for CPU processes. An explicit choice is checked.

    Args:
        memory: bytes of one device (default: measured, :func:`device_bytes`).
        on_gpu: whether the processes run on GPUs (default: whether CUDA is available).

    Raises:
        ConfigError: fsdp with an 8-bit base, 4-bit experts or an offloaded input embedding, or on CPU processes.
    """
    on_gpu = torch.cuda.is_available() if on_gpu is None else on_gpu
    requested = config.distributed.strategy
    q = config.quantization
    dtype_bytes = 4 if config.model.dtype == "float32" else 2
    parameters = count_parameters(hf_config)
    trainable = parameters if config.model.full_finetuning else lora_parameters(hf_config, config.lora.r)
    plan = memory_plan(parameters, trainable, dtype_bytes, world_size, q.load_in_4bit, q.load_in_8bit,
                       config.model.full_finetuning)
    memory = device_bytes() if memory is None else memory
    if requested == "auto" and not on_gpu:
        chosen, reason = "ddp", "auto: CPU processes train with ddp"
    elif requested == "auto":
        fits = plan.replicated_bytes <= 0.6 * memory
        chosen = "ddp" if fits or q.load_in_8bit or config.model.offload_embedding or unshardable_weights(
            hf_config) or four_bit_experts(config, hf_config) else "fsdp"
        why = "fits one device" if fits else "does not fit one device"
        reason = f"auto: the training state ({plan.replicated_bytes / 2**30:.1f} GiB) {why}"
    else:
        chosen, reason = requested, "as configured"
    check_strategy(chosen, config, on_gpu, hf_config)
    return chosen, f"{chosen} over {world_size} processes ({'nccl' if on_gpu else 'gloo'}; {reason})"


def unshardable_weights(hf_config: Any) -> str | None:
    """How a checkpoint saved already quantized by bitsandbytes stores its weights, when FSDP cannot
    shard them: 8-bit, or 4-bit packed in uint8 (a 4-bit base quantized on load is stored in the
    compute dtype instead, see ``pipeline.load``). ``None`` for any other checkpoint."""
    saved = getattr(hf_config, "quantization_config", None)
    if saved is None:
        return None
    saved = saved if isinstance(saved, dict) else saved.to_dict()
    if saved.get("quant_method", "bitsandbytes") != "bitsandbytes":
        return None
    if saved.get("load_in_8bit"):
        return "8-bit (LLM.int8)"
    storage = str(saved.get("bnb_4bit_quant_storage") or "uint8").removeprefix("torch.")
    if saved.get("load_in_4bit") and storage not in ("bfloat16", "float16", "float32"):
        return f"4-bit packed in {storage}"
    return None


def four_bit_experts(config: Any, hf_config: Any) -> bool:
    """Whether the run stores a mixture of experts' fused expert weights NF4 itself (``load_in_4bit`` on a model
    with routed experts): they are held outside the parameters, whose stand-ins FSDP cannot shard."""
    if hf_config is None or not config.quantization.load_in_4bit:
        return False
    text = hf_config.get_text_config()
    experts = getattr(text, "num_experts", None) or getattr(text, "num_local_experts", None)
    return bool(experts and experts > 1)


def check_strategy(strategy: str, config: Any, on_gpu: bool, hf_config: Any = None) -> None:
    """A strategy that cannot serve the request: one line naming the keys.

    fsdp runs on GPUs only: accelerate applies FSDP2 to CUDA processes and trains CPU processes with
    DDP whatever the config says.
    """
    if strategy != "fsdp":
        return
    if not on_gpu:
        raise ConfigError("distributed.strategy: fsdp needs CUDA GPUs (accelerate shards models across GPU "
                          "processes only); CPU processes train with ddp")
    saved = unshardable_weights(hf_config)
    if saved is not None:
        raise ConfigError(f"distributed.strategy: fsdp cannot shard {config.model.name_or_path}: its weights are "
                          f"saved {saved}; use ddp, or a 16-bit checkpoint of the model with "
                          f"quantization.load_in_4bit (quantized on load in a dtype fsdp shards)")
    if config.quantization.load_in_8bit:
        raise ConfigError("distributed.strategy: fsdp cannot shard an 8-bit (LLM.int8) base; use ddp, or "
                          "quantization.load_in_4bit")
    if four_bit_experts(config, hf_config):
        raise ConfigError("distributed.strategy: fsdp cannot shard the experts of a mixture of experts with "
                          "quantization.load_in_4bit (ftengine stores them NF4 outside the parameters); use ddp")
    if config.model.offload_embedding:
        raise ConfigError("model.offload_embedding: the input embedding cannot stay in CPU memory while fsdp "
                          "shards it; turn it off or use distributed.strategy: ddp")


def decoder_layer_classes(model: Any) -> list[str]:
    """Class names of the model's decoder layers (what FSDP2 shards one by one)."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    names = {type(m).__name__ for m in model.modules() if isinstance(m, GradientCheckpointingLayer)}
    if not names:
        names = set(getattr(model, "_no_split_modules", None) or [])
    if not names:
        raise ConfigError(f"distributed.strategy: fsdp needs the model's decoder layer class; "
                          f"{type(model).__name__} declares none (use ddp)")
    return sorted(names)


def trainer_arguments(strategy: str, model: Any, reshard_after_forward: bool = True) -> dict[str, Any]:
    """The ``TrainingArguments`` keywords of a strategy (accelerate reads them when the trainer starts).

    ddp: no search for unused parameters (LoRA and full fine-tuning use every trained weight).
    fsdp: FSDP2 over each decoder layer and the root, sharded checkpoints through
    ``torch.distributed.checkpoint``.
    """
    if strategy == "ddp":
        return {"ddp_find_unused_parameters": False, "ddp_backend": backend()}
    return {
        "ddp_backend": backend(),
        "fsdp": True,
        "fsdp_config": {
            "version": 2,
            "transformer_layer_cls_to_wrap": decoder_layer_classes(model),
            "reshard_after_forward": reshard_after_forward,
            "state_dict_type": "SHARDED_STATE_DICT",
            "cpu_ram_efficient_loading": False,
            "activation_checkpointing": False,
        },
    }


def api_trainer_arguments(strategy: str, model: Any) -> dict[str, Any]:
    """:func:`trainer_arguments` for the Python API's ``ftengine.train`` under a launcher.

    Raises:
        ConfigError: an unknown strategy, or fsdp on CPU processes.
    """
    if strategy not in ("ddp", "fsdp"):
        raise ConfigError(f"train: strategy must be ddp or fsdp, got {strategy!r}")
    if strategy == "fsdp" and not torch.cuda.is_available():
        raise ConfigError("train: strategy fsdp needs CUDA GPUs (accelerate shards models across GPU processes "
                          "only); CPU processes train with ddp")
    packed = next((name for name, p in model.named_parameters() if type(p).__name__ in ("Params4bit", "Int8Params")
                   and not p.is_floating_point()), None)
    if strategy == "fsdp" and packed is not None:
        raise ConfigError(f"train: strategy fsdp cannot shard {packed}, quantized weights packed in "
                          f"{str(model.get_parameter(packed).dtype).removeprefix('torch.')}; call "
                          "ftengine.load_model(..., load_in_4bit=True) under torchrun (it stores the 4-bit weights "
                          "in the compute dtype, which fsdp shards), or train with strategy ddp")
    if strategy == "fsdp" and any(NF4_EXPERTS_ATTR in module.__dict__ for module in model.modules()):
        raise ConfigError("train: strategy fsdp cannot shard the experts of a mixture of experts loaded with "
                          "load_in_4bit (ftengine stores them NF4 outside the parameters); train with strategy ddp")
    return trainer_arguments(strategy, model)


# ----------------------------------------------------------------------------- checkpoints and exports


def write_checkpoint_info(checkpoint: Path, world_size: int, strategy: str, global_batch: int | None = None) -> None:
    """Record the number of processes, the strategy and the global batch (samples per optimizer step)."""
    info = {"world_size": world_size, "strategy": strategy, **({"global_batch": global_batch} if global_batch else {})}
    (checkpoint / CHECKPOINT_INFO).write_text(json.dumps(info) + "\n")


def check_resume(checkpoint: Path, world_size: int, strategy: str, per_device: int = 1,
                 accumulation: int = 1) -> int:
    """The gradient accumulation steps that resume ``checkpoint`` on ``world_size`` processes.

    With the processes and the strategy that wrote it: ``accumulation`` as it is. With another number
    of processes, where every checkpoint holds the whole model (ddp, or one process): the accumulation
    that keeps the global batch (``per_device * processes * accumulation``) the checkpoint was trained
    with, so the data position, the samples of every later step and the schedule continue as they
    would have (each process's random state starts afresh: it only matters for dropout). An fsdp
    checkpoint holds each process's shard: it resumes with the same number of processes only.

    Raises:
        FtengineError: another strategy, an fsdp checkpoint (or an fsdp resume) with another number of
            processes, or a global batch that ``per_device`` on ``world_size`` processes cannot make up.
    """
    path = checkpoint / CHECKPOINT_INFO
    saved = json.loads(path.read_text()) if path.exists() else {"world_size": 1, "strategy": "ddp"}
    written = saved["world_size"]
    saved_strategy = "ddp" if written == 1 else saved["strategy"]
    if written == world_size:
        if written > 1 and saved_strategy != strategy:
            raise FtengineError(f"{checkpoint}: written with distributed.strategy {saved_strategy}, resumed with "
                                f"{strategy}; set distributed.strategy: {saved_strategy}")
        return accumulation
    if "fsdp" in (saved_strategy, strategy):
        raise FtengineError(f"{checkpoint}: written by {written} process(es) with {saved_strategy}, resumed with "
                            f"{world_size} with {strategy}; fsdp checkpoints hold each process's shard: resume "
                            f"with --gpus {written} and distributed.strategy: {saved_strategy}")
    batch = saved.get("global_batch")
    if batch is None:
        raise FtengineError(f"{checkpoint}: written by {written} process(es) without its global batch; resume "
                            f"with --gpus {written}")
    if batch % (per_device * world_size):
        raise FtengineError(f"{checkpoint}: trained with a global batch of {batch} samples, which {world_size} "
                            f"process(es) of per_device_train_batch_size {per_device} cannot make up; resume "
                            f"with --gpus {written}, or a per_device_train_batch_size that divides "
                            f"{batch // world_size if batch % world_size == 0 else batch}")
    return batch // (per_device * world_size)


def resume_config(config: Any, checkpoint: Path | None, world_size: int, strategy: str) -> tuple[Any, str | None]:
    """``config`` for resuming ``checkpoint`` on ``world_size`` processes (:func:`check_resume`), and a
    note when its gradient accumulation changed to keep the global batch."""
    t = config.training
    if checkpoint is None:
        return config, None
    accumulation = check_resume(checkpoint, world_size, strategy, t.per_device_train_batch_size,
                                t.gradient_accumulation_steps)
    if accumulation == t.gradient_accumulation_steps:
        return config, None
    note = (f"resumed on {world_size} process(es): gradient_accumulation_steps {t.gradient_accumulation_steps} -> "
            f"{accumulation} keeps the global batch of {accumulation * world_size * t.per_device_train_batch_size}")
    training = t.model_copy(update={"gradient_accumulation_steps": accumulation})
    return config.model_copy(update={"training": training}), note


def is_sharded(model: Any) -> bool:
    """Whether FSDP2 sharded the model's parameters (they are DTensors)."""
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in model.parameters())


def exports_here(model: Any) -> bool:
    """Whether this process writes the Python API's export of ``model``: rank 0 of a DDP job (the
    model is the same on every rank) or a single process.

    Raises:
        FtengineError: an FSDP-sharded model (``ftengine run`` gathers it to rank 0 for its exports).
    """
    if _initialized() and is_sharded(model):
        raise FtengineError("export: the model is sharded by FSDP across the processes; export it from "
                            "`ftengine run` (its export stage gathers the weights to rank 0) or train with ddp")
    return is_main_process()


def gather_state_dict(model: Any, trainable_only: bool) -> dict[str, torch.Tensor] | None:
    """The full (unsharded) state dict of an FSDP2 model on rank 0's CPU (``None`` on the other ranks).

    Every rank must call it: each sharded tensor is all-gathered in turn, so only one full tensor
    is on the device at a time. ``trainable_only``: the trained weights only (LoRA).
    """
    from torch.distributed.tensor import DTensor

    main = is_main_process()
    out: dict[str, torch.Tensor] = {}
    for name, param in model.named_parameters():
        if trainable_only and not param.requires_grad:
            continue
        full = param.full_tensor() if isinstance(param, DTensor) else param.detach()
        if main:
            out[name] = full.detach().to("cpu", copy=True)
        del full
    return out if main else None


def load_gathered(model: Any, state: dict[str, torch.Tensor]) -> None:
    """Copy gathered weights into an unsharded copy of the model (same parameter names)."""
    params = dict(model.named_parameters())
    missing = sorted(set(state) - set(params))
    if missing:
        raise RuntimeError(f"gathered weights without a parameter in the export model: {missing[:3]}")
    with torch.no_grad():
        for name, value in state.items():
            params[name].copy_(value.to(params[name].device, params[name].dtype))


# ----------------------------------------------------------------------------- errors


def record_error(exc: BaseException) -> None:
    """Leave this rank's error where the elastic launcher reads it (``TORCHELASTIC_ERROR_FILE``)."""
    if not os.environ.get("TORCHELASTIC_ERROR_FILE"):
        return
    from torch.distributed.elastic.multiprocessing.errors import ErrorHandler

    ErrorHandler().record_exception(exc)


def error_line(exc: BaseException) -> str:
    """The one line a rank's error becomes: ``rank N: <message>`` when there are several ranks."""
    info = rank_info()
    return f"rank {info.rank}: {exc}" if info.distributed else str(exc)
