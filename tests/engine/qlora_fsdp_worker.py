"""Run under torchrun by ``test_distributed_qlora.py`` (or with ``python``: the one-process twin): QLoRA
with the NF4 base stored in the compute dtype (what ``pipeline.load`` does for fsdp), FSDP2-sharded
over the processes (``fully_shard`` per decoder layer and the root, as accelerate does on GPUs), a few
AdamW steps on one global batch split across the ranks. Rank 0 writes the losses, how every projection
was routed during the sharded steps, and the trained LoRA weights gathered from the shards.

Usage: ``torchrun --nproc-per-node 2 qlora_fsdp_worker.py CONFIG OUT_DIR``
"""

import json
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor

from ftengine.core.config import load_config
from ftengine.engine import distributed
from ftengine.engine import pipeline
from ftengine.engine.memory.checkpointing import decoder_layers
from ftengine.plugins.models import _patching

GLOBAL_BATCH, SEQ, STEPS = 4, 48, 3


def main() -> None:
    config, out = load_config(sys.argv[1]), Path(sys.argv[2])
    rank = distributed.rank_info()
    distributed.init_process_group(rank)
    model = pipeline.load_adapted(config, "fsdp").model
    packed = {name: p.numel() for name, p in model.named_parameters() if type(p).__name__ == "Params4bit"}
    assert packed and all(p.dtype == torch.float32 for p in model.parameters()), "4-bit storage is not fp32"
    if rank.distributed:
        for layer in decoder_layers(model):
            fully_shard(layer)
        fully_shard(model)
    params = dict(model.named_parameters())
    # every packed 4-bit weight is sharded: each rank holds its part of the bytes, not all of them
    local = {name: params[name].to_local().numel() if isinstance(params[name], DTensor) else params[name].numel()
             for name in packed}

    routes: list[str] = []
    route = _patching.route

    def recording(module):
        weights, kind = route(module)
        routes.append(kind)
        return weights, kind

    _patching.route = recording
    ids = torch.randint(3, model.config.vocab_size, (GLOBAL_BATCH, SEQ), generator=torch.Generator().manual_seed(0))
    per_rank = GLOBAL_BATCH // rank.world_size
    mine = ids[rank.rank * per_rank:(rank.rank + 1) * per_rank]
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    losses = []
    for _ in range(STEPS):
        loss = model(input_ids=mine, labels=mine).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(sum(distributed.gather_objects(loss.item())) / rank.world_size)
    trained = distributed.gather_state_dict(model, trainable_only=True) if rank.distributed else \
        {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    if rank.is_main:
        out.mkdir(parents=True, exist_ok=True)
        save_file(trained, out / "lora.safetensors")
        (out / "result.json").write_text(json.dumps({"losses": losses, "routes": sorted(set(routes)),
                                                     "packed": packed, "local": local}))
    distributed.shutdown()


if __name__ == "__main__":
    main()
