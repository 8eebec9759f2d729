"""Shared pieces of the mixture-of-experts adapter tests.

The reference is the unpatched Hugging Face model with transformers' per-expert loop
(``_experts_implementation = "eager"``) and peft's own ``ParamWrapper`` path for the expert and
router LoRA; the patched copy runs the ``lora_moe`` op on the same weights and adapters. The
router's load-balancing loss is switched on with a large coefficient so that it weighs in the loss
and in the router gradients.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import torch

from .helpers import adapter
from .helpers import batch
from .helpers import rel_err
from .helpers import tiny_pair


def tiny_qwen3_moe_checkpoint(path: Path, seed: int = 0) -> Path:
    """A saved random-weight Qwen3-MoE (2 layers, 4 experts, top 2) with the demo tokenizer, for whole runs."""
    from transformers import Qwen3MoeConfig
    from transformers import Qwen3MoeForCausalLM

    from ftengine.demo import ASSETS

    config = Qwen3MoeConfig(vocab_size=640, hidden_size=64, intermediate_size=96, moe_intermediate_size=32,
                            num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                            num_experts=4, num_experts_per_tok=2, norm_topk_prob=True, max_position_embeddings=64,
                            tie_word_embeddings=False, initializer_range=0.1)
    torch.manual_seed(seed)
    Qwen3MoeForCausalLM(config).save_pretrained(str(path))
    for file in (ASSETS / "tokenizer").iterdir():
        shutil.copy(file, path / file.name)
    return path


def moe_pair(model_cls: type, config: Any, family: str, router: bool = True) -> tuple[Any, Any, list[str]]:
    """``tiny_pair`` with LoRA on the attention, every expert's projections and (``router``) the router, named
    as users name them (the adapter's defaults, plus ``gate``), which peft maps onto the fused parameters."""
    config._attn_implementation = "sdpa"
    config._experts_implementation = "eager"
    targets = list(adapter(family).default_target_modules) + (["gate"] if router else [])
    return tiny_pair(model_cls, config, family, target_modules=targets)


def assert_experts_fused(family: str, patched: Any, n_blocks: int) -> None:
    """Every sparse block runs ``lora_moe`` with its experts' LoRA, every projection a fused op."""
    routes = adapter(family).routes(patched)
    assert f"experts fused lora x{n_blocks}" in routes, routes
    assert all(line.startswith(("fused lora", "fused linear", "experts fused lora")) for line in routes), routes


def assert_aux_loss_matches(reference: Any, patched: Any, vocab: int, tol: float = 1e-5) -> None:
    """The auxiliary loss each returns, and that it moved the total (the router gradients saw it)."""
    inputs = batch(vocab)
    reference.train()
    patched.train()
    out_ref, out_pat = reference(**inputs), patched(**inputs)
    assert out_pat.aux_loss is not None and out_ref.aux_loss is not None
    assert abs(out_pat.aux_loss.item() - out_ref.aux_loss.item()) <= tol * abs(out_ref.aux_loss.item())
    without = patched(**inputs, output_router_logits=False)
    assert getattr(without, "aux_loss", None) is None
    coef = patched.config.router_aux_loss_coef
    expected = without.loss.item() + coef * out_pat.aux_loss.item()
    assert abs(out_pat.loss.item() - expected) <= tol * abs(expected)


def router_grads_nonzero(model: Any) -> None:
    grads = [p.grad for n, p in model.named_parameters() if ".mlp.gate.lora_" in n]
    assert grads and all(g is not None and g.abs().sum() > 0 for g in grads), "the router LoRA got no gradient"


def full_finetune_grads(model_cls: type, config: Any, family: str, vocab: int) -> tuple[dict, dict]:
    """Every weight trainable, no LoRA: the gradients of the unpatched and the patched model."""
    import copy

    from ftengine.core.kernels import get_op

    config._attn_implementation = "sdpa"
    config._experts_implementation = "eager"
    torch.manual_seed(0)
    reference = model_cls(config).float()
    patched = copy.deepcopy(reference)
    adapter(family).patch(patched, get_op)
    grads = []
    for model in (reference, patched):
        model.train()
        model(**batch(vocab)).loss.backward()
        grads.append({n: p.grad for n, p in model.named_parameters()})
    return grads[0], grads[1]


def assert_full_finetune_matches(model_cls: type, config: Any, family: str, vocab: int, tol: float = 1e-5) -> None:
    g_ref, g_pat = full_finetune_grads(model_cls, config, family, vocab)
    experts = [n for n in g_ref if "experts" in n or ".mlp.gate." in n]
    assert experts
    for name in experts:
        assert rel_err(g_pat[name], g_ref[name]) <= tol, f"gradient of {name}"
