"""Run under torchrun by ``test_distributed.py``: the tiny LoRA model FSDP2-sharded over CPU processes
(``fully_shard`` per decoder layer and the root, as accelerate does on GPUs), its weights gathered to
rank 0 for the exports; rank 0 also exports an unsharded copy holding the same weights.

Usage: ``torchrun --nproc-per-node 2 fsdp_export_worker.py CONFIG OUT_DIR``
"""

import copy
import sys
from pathlib import Path

import torch
from torch.distributed.fsdp import fully_shard

from ftengine.core.config import load_config
from ftengine.engine import distributed
from ftengine.engine import pipeline
from ftengine.engine.exporting import export_all
from ftengine.engine.memory.checkpointing import decoder_layers
from ftengine.engine.templates import apply_chat_template


def main() -> None:
    config, out = load_config(sys.argv[1]), Path(sys.argv[2])
    rank = distributed.rank_info()
    distributed.init_process_group(rank)
    loaded = pipeline.load_adapted(config)
    apply_chat_template(loaded.tokenizer, "chatml")
    torch.manual_seed(5)  # the same "trained" adapter on every rank
    with torch.no_grad():
        for param in loaded.model.parameters():
            if param.requires_grad:
                param.normal_(0.0, 0.05)
    reference = copy.deepcopy(loaded.model) if rank.is_main else None
    for layer in decoder_layers(loaded.model):
        fully_shard(layer)
    fully_shard(loaded.model)
    assert distributed.is_sharded(loaded.model)
    exported = pipeline.model_for_export(loaded, config)
    if rank.is_main:
        exported.eval()
        reference.eval()
        export_all(exported, loaded.tokenizer, config.export, out / "gathered")
        export_all(reference, loaded.tokenizer, config.export, out / "reference")
    distributed.shutdown()


if __name__ == "__main__":
    main()
