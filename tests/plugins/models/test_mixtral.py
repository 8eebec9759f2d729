"""Mixtral adapter: patched == unpatched Hugging Face (transformers' expert loop, peft's expert and
router LoRA): loss with the auxiliary loss, every LoRA gradient, eval logits; full fine-tuning."""

from __future__ import annotations

from transformers import MixtralConfig
from transformers import MixtralForCausalLM

from .helpers import adapter
from .helpers import assert_equivalent
from .moe_helpers import assert_aux_loss_matches
from .moe_helpers import assert_experts_fused
from .moe_helpers import assert_full_finetune_matches
from .moe_helpers import moe_pair
from .moe_helpers import router_grads_nonzero

VOCAB = 128


def config(**overrides) -> MixtralConfig:
    values = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=32, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2, max_position_embeddings=64,
                  output_router_logits=True, router_aux_loss_coef=0.5)
    values.update(overrides)
    return MixtralConfig(**values)


def test_patched_matches_hf():
    """Reference kernels only: the Triton ops it would add are the ones test_qwen3_moe runs on the backend."""
    reference, patched, _ = moe_pair(MixtralForCausalLM, config(), "mixtral")
    assert_experts_fused("mixtral", patched, n_blocks=2)
    assert_equivalent(reference, patched, VOCAB)
    router_grads_nonzero(patched)


def test_aux_loss_matches_hf():
    reference, patched, _ = moe_pair(MixtralForCausalLM, config(), "mixtral", router=False)
    assert_aux_loss_matches(reference, patched, VOCAB)


def test_full_finetuning_expert_and_router_gradients_match_hf():
    assert_full_finetune_matches(MixtralForCausalLM, config(), "mixtral", VOCAB)


def test_gguf_layout():
    ours = adapter("mixtral")
    cfg = config()
    assert ours.gguf.architecture == "llama"
    assert ours.gguf.tensor_name("model.layers.1.mlp.experts.down_proj.weight") == "blk.1.ffn_down_exps.weight"
    meta = ours.gguf.metadata(cfg)
    assert meta["expert_count"] == 4 and meta["expert_used_count"] == 2


def test_patching_after_lora_is_attached():
    """Patched after peft wrapped the experts: the blocks still run ``lora_moe``, with the same logits."""
    import torch
    from peft import LoraConfig
    from peft import get_peft_model

    from ftengine.core.kernels import get_op

    cfg = config()
    cfg._experts_implementation = "eager"
    torch.manual_seed(0)
    model = get_peft_model(MixtralForCausalLM(cfg), LoraConfig(r=4, init_lora_weights=False,
                                                               target_modules=list(adapter("mixtral").default_target_modules)))
    model.eval()
    ids = torch.randint(0, VOCAB, (1, 10))
    with torch.no_grad():
        before = model(input_ids=ids).logits
        lines = adapter("mixtral").patch(model, get_op)
        after = model(input_ids=ids).logits
    assert any("lora_moe" in line for line in lines), lines
    assert "experts fused lora x2" in adapter("mixtral").routes(model)
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-5)
