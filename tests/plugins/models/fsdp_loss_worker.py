"""Run under torchrun by ``test_causal_lm.py``: a tiny patched Qwen2 with LoRA, FSDP2-sharded over CPU
processes, one training forward and backward; rank 0 prints the loss, the gradients gathered whole, the
unpatched model's on the same batch, and how often the fused loss op ran.

``tail``: sharded as accelerate shards it (each decoder layer, the embedding, the final norm with the LM
head in one unit kept gathered after its forward, the root). ``alone``: the LM head a unit of its own.

Usage: ``torchrun --nproc-per-node 2 fsdp_loss_worker.py tail|alone``
"""

import collections
import json
import sys

import torch.distributed as dist
from torch.distributed.fsdp import fully_shard
from transformers import Qwen2Config
from transformers import Qwen2ForCausalLM

from ftengine.core import kernels
from tests.plugins.models.helpers import batch
from tests.plugins.models.helpers import counting_resolve_op
from tests.plugins.models.helpers import tiny_pair

VOCAB = 128


def main() -> None:
    dist.init_process_group("gloo")
    calls = collections.Counter()
    kernels.resolve_op = counting_resolve_op(calls)
    config = Qwen2Config(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=64,
                         tie_word_embeddings=False)
    reference, patched, _ = tiny_pair(Qwen2ForCausalLM, config, "qwen2")
    for model in (reference, patched):  # the head trained too: its gradient goes through the fused loss
        model.get_base_model().lm_head.weight.requires_grad_(True)
    inputs = batch(VOCAB)
    reference(**inputs).loss.backward()

    causal_lm = patched.get_base_model()
    for layer in causal_lm.model.layers:
        fully_shard(layer)
    fully_shard(causal_lm.model.embed_tokens)
    if sys.argv[1] == "tail":
        fully_shard([causal_lm.model.norm, causal_lm.lm_head], reshard_after_forward=False)
    else:
        fully_shard(causal_lm.lm_head)
    fully_shard(patched)
    loss = patched(**inputs).loss
    loss.backward()
    grads = {n: p.grad.full_tensor() for n, p in patched.named_parameters() if p.requires_grad}
    if dist.get_rank() == 0:
        expected = {n: p.grad for n, p in reference.named_parameters() if p.requires_grad}
        print(json.dumps({
            "loss": loss.item(),
            "reference_loss": reference(**inputs).loss.item(),
            "head": type(causal_lm.lm_head).__name__,
            "max_grad_rel_err": max(((grads[n] - g).norm() / g.norm()).item() for n, g in expected.items()),
            "grads": len(grads),
            "linear_cross_entropy_calls": calls["linear_cross_entropy"],
        }))
    dist.barrier()  # rank 1 tearing gloo down while rank 0 still computes the reference can abort it
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
