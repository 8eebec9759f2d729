"""Qwen3-MoE adapter: patched == unpatched Hugging Face (transformers' expert loop, peft's expert and
router LoRA): loss with the router's auxiliary loss, every LoRA gradient (router included), eval
logits; a dense ``mlp_only_layers`` layer; full fine-tuning; the auxiliary loss against transformers'
own function; GGUF names."""

from __future__ import annotations

import pytest
import torch
from transformers import Qwen3MoeConfig
from transformers import Qwen3MoeForCausalLM
from transformers.models.qwen3_moe import modeling_qwen3_moe

from ftengine.plugins.models._moe import load_balancing_loss

from .helpers import BACKENDS
from .helpers import adapter
from .helpers import assert_equivalent
from .helpers import assert_num_items_in_batch
from .helpers import use_backend
from .moe_helpers import assert_aux_loss_matches
from .moe_helpers import assert_experts_fused
from .moe_helpers import assert_full_finetune_matches
from .moe_helpers import moe_pair
from .moe_helpers import router_grads_nonzero

VOCAB = 128


def config(**overrides) -> Qwen3MoeConfig:
    values = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, moe_intermediate_size=32,
                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_experts=4,
                  num_experts_per_tok=2, norm_topk_prob=True, max_position_embeddings=64, mlp_only_layers=[1],
                  output_router_logits=True, router_aux_loss_coef=0.5, tie_word_embeddings=False)
    values.update(overrides)
    return Qwen3MoeConfig(**values)


@pytest.mark.parametrize("backend", BACKENDS)
def test_patched_matches_hf(backend, monkeypatch):
    use_backend(monkeypatch, backend)
    reference, patched, lines = moe_pair(Qwen3MoeForCausalLM, config(), "qwen3_moe")
    assert any("lora_moe" in line for line in lines) and any("mlp x1" in line for line in lines), lines
    assert_experts_fused("qwen3_moe", patched, n_blocks=1)
    assert_equivalent(reference, patched, VOCAB, tol=1e-5 if backend == "reference" else 1e-4)
    router_grads_nonzero(patched)


def test_aux_loss_and_loss_count_match_hf():
    reference, patched, _ = moe_pair(Qwen3MoeForCausalLM, config(mlp_only_layers=[], norm_topk_prob=False),
                                     "qwen3_moe")
    assert_aux_loss_matches(reference, patched, VOCAB)
    assert_num_items_in_batch(reference, patched, VOCAB)


def test_full_finetuning_expert_and_router_gradients_match_hf():
    assert_full_finetune_matches(Qwen3MoeForCausalLM, config(mlp_only_layers=[]), "qwen3_moe", VOCAB)


@pytest.mark.parametrize("masked", [False, True])
def test_load_balancing_loss_matches_transformers_function(masked):
    g = torch.Generator().manual_seed(0)
    logits = tuple(torch.randn(2 * 7, 6, generator=g, requires_grad=True) for _ in range(3))
    mask = torch.ones(2, 7, dtype=torch.long)
    mask[1, 4:] = 0
    kwargs = {"attention_mask": mask} if masked else {}
    ours = load_balancing_loss(logits, 6, 2, **kwargs)
    theirs = modeling_qwen3_moe.load_balancing_loss_func(logits, 6, 2, **kwargs)
    torch.testing.assert_close(ours, theirs)
    g_ours = torch.autograd.grad(ours, logits)
    g_theirs = torch.autograd.grad(theirs, logits)
    for a, b in zip(g_ours, g_theirs, strict=True):
        torch.testing.assert_close(a, b)


def test_gguf_names_and_metadata():
    cfg = config(mlp_only_layers=[])
    model = Qwen3MoeForCausalLM(cfg)
    ours = adapter("qwen3_moe")
    names = {}
    for hf_name, tensor in model.state_dict().items():
        for name, part in ours.gguf.split_tensor(hf_name, tensor):
            names[name] = (ours.gguf.tensor_name(name), tuple(part.shape))
    assert names["model.layers.1.mlp.experts.gate_proj.weight"] == ("blk.1.ffn_gate_exps.weight", (4, 32, 64))
    assert names["model.layers.1.mlp.experts.up_proj.weight"] == ("blk.1.ffn_up_exps.weight", (4, 32, 64))
    assert names["model.layers.1.mlp.experts.down_proj.weight"] == ("blk.1.ffn_down_exps.weight", (4, 64, 32))
    assert names["model.layers.0.mlp.gate.weight"] == ("blk.0.ffn_gate_inp.weight", (4, 64))
    assert names["model.layers.0.self_attn.k_norm.weight"][0] == "blk.0.attn_k_norm.weight"
    gate_up = model.model.layers[0].mlp.experts.gate_up_proj
    split = dict(ours.gguf.split_tensor("model.layers.0.mlp.experts.gate_up_proj", gate_up))
    torch.testing.assert_close(split["model.layers.0.mlp.experts.gate_proj.weight"], gate_up[:, :32])
    torch.testing.assert_close(split["model.layers.0.mlp.experts.up_proj.weight"], gate_up[:, 32:])
    meta = ours.gguf.metadata(cfg)
    assert meta["expert_count"] == 4 and meta["expert_used_count"] == 2
    assert meta["expert_feed_forward_length"] == 32 and meta["attention.key_length"] == 16


def test_run_config_target_parameters_reach_peft():
    """``lora.target_parameters`` (the run config's / ``add_lora``'s) adapts exactly the named fused parameters."""
    from ftengine.core.config import LoRAConfig
    from ftengine.core.config import validate_section
    from ftengine.engine import pipeline

    lora = validate_section(LoRAConfig, {"r": 4, "target_modules": ["q_proj"],
                                         "target_parameters": ["mlp.gate.weight", "mlp.experts.down_proj"]}, "lora")
    loaded = pipeline.adapt(pipeline.LoadedModel(Qwen3MoeForCausalLM(config(mlp_only_layers=[])), None,
                                                 adapter("qwen3_moe")), lora, gradient_checkpointing=False)
    trained = {n.split(".lora_")[0].removeprefix("base_model.model.") for n, p in loaded.model.named_parameters()
               if p.requires_grad}
    layer = "model.layers.0"
    assert {f"{layer}.self_attn.q_proj", f"{layer}.mlp.gate", f"{layer}.mlp.experts"} <= trained
    wrapped = loaded.model.base_model.model.model.layers[0].mlp.experts
    assert wrapped.parameter_name == "down_proj" and type(wrapped.base_layer).__name__ == "Qwen3MoeExperts"
    assert any("mlp.gate.weight" in note for note in loaded.notes)


@pytest.mark.gpu
def test_bf16_on_gpu_as_close_to_fp32_as_hf(monkeypatch):
    """bf16 on the GPU (``torch._grouped_mm``): loss, LoRA gradients (experts included) and logits as close to
    the fp32 truth as transformers + peft in bf16."""
    from .helpers import GPU_SIZES
    from .helpers import assert_bf16_as_close_as_hf

    use_backend(monkeypatch, "triton")
    sizes = {**GPU_SIZES, "moe_intermediate_size": 128, "num_experts": 8, "num_experts_per_tok": 2,
             "mlp_only_layers": [], "output_router_logits": True, "router_aux_loss_coef": 0.01}
    assert_bf16_as_close_as_hf(Qwen3MoeForCausalLM, config(**sizes), "qwen3_moe")
