"""Llama adapter: patched == unpatched Hugging Face (logits, loss, LoRA gradients), QLoRA, packing, GGUF."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig
from transformers import LlamaForCausalLM

from ftengine.plugins.models import _gguf

from .helpers import BACKENDS
from .helpers import GPU_SIZES
from .helpers import adapter
from .helpers import assert_bf16_as_close_as_hf
from .helpers import assert_equivalent
from .helpers import assert_fully_fused
from .helpers import assert_num_items_in_batch
from .helpers import assert_packed_equivalent
from .helpers import tiny_pair
from .helpers import use_backend

VOCAB = 99
LLAMA31_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": 32}


def config(**overrides) -> LlamaConfig:
    values = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=64, rope_theta=500000.0,
                  rope_scaling=LLAMA31_ROPE, tie_word_embeddings=False)
    values.update(overrides)
    cfg = LlamaConfig(**values)
    cfg._attn_implementation = "sdpa"
    return cfg


@pytest.mark.parametrize("backend", BACKENDS)
def test_patched_matches_hf(backend, monkeypatch):
    use_backend(monkeypatch, backend)
    reference, patched, lines = tiny_pair(LlamaForCausalLM, config(), "llama")
    assert any(line.startswith("rms_norm x5 ->") for line in lines), lines
    assert_fully_fused("llama", patched)
    assert_equivalent(reference, patched, VOCAB, tol=1e-5 if backend == "reference" else 1e-4)


def test_loss_count_and_packing_match_hf():
    """The grad-accumulation loss (``num_items_in_batch``) and packed rows (position ids restart)."""
    reference, patched, _ = tiny_pair(LlamaForCausalLM, config(), "llama")
    assert_num_items_in_batch(reference, patched, VOCAB)
    assert_packed_equivalent(reference, patched, VOCAB)


def test_dora_falls_back_to_peft_and_still_matches(monkeypatch):
    from ftengine.plugins.models import _patching

    monkeypatch.setattr(_patching, "_FALLBACK_WARNED", set())  # the warning is once per process
    reference, patched, _ = tiny_pair(LlamaForCausalLM, config(), "llama", use_dora=True)
    routes = adapter("llama").routes(patched)
    assert routes == ["peft path (DoRA or another LoRA variant) x14"], routes
    with pytest.warns(UserWarning, match="runs unfused"):
        assert_equivalent(reference, patched, VOCAB)


def test_unpatch_restores_the_class_forwards():
    _, patched, lines = tiny_pair(LlamaForCausalLM, config(), "llama")
    assert adapter("llama").unpatch(patched) == 5 + 2 + 2 + 1
    assert adapter("llama").routes(patched) == []


def test_gguf_names_cover_the_state_dict():
    model = LlamaForCausalLM(config())
    names = {n: adapter("llama").gguf.tensor_name(n) for n in model.state_dict()}
    assert names["model.embed_tokens.weight"] == "token_embd.weight"
    assert names["lm_head.weight"] == "output.weight"
    assert names["model.norm.weight"] == "output_norm.weight"
    assert names["model.layers.1.self_attn.q_proj.weight"] == "blk.1.attn_q.weight"
    assert names["model.layers.1.self_attn.o_proj.weight"] == "blk.1.attn_output.weight"
    assert names["model.layers.0.input_layernorm.weight"] == "blk.0.attn_norm.weight"
    assert names["model.layers.0.post_attention_layernorm.weight"] == "blk.0.ffn_norm.weight"
    assert names["model.layers.0.mlp.gate_proj.weight"] == "blk.0.ffn_gate.weight"
    assert names["model.layers.0.mlp.up_proj.weight"] == "blk.0.ffn_up.weight"
    assert names["model.layers.0.mlp.down_proj.weight"] == "blk.0.ffn_down.weight"
    assert len(set(names.values())) == len(names)
    assert adapter("llama").gguf.tensor_name("model.layers.0.self_attn.rotary_emb.inv_freq") is None
    with pytest.raises(KeyError):
        adapter("llama").gguf.tensor_name("model.layers.0.mystery.weight")


def _interleaved_rope(x: torch.Tensor, positions: torch.Tensor, base: float) -> torch.Tensor:
    """llama.cpp's rotary form: rotate adjacent pairs (2i, 2i+1) by position * base**(-2i/D)."""
    d = x.shape[-1]
    angle = positions[:, None].float() * base ** (-torch.arange(0, d, 2).float() / d)  # (T, D/2)
    cos, sin = angle.cos(), angle.sin()
    even, odd = x[..., 0::2], x[..., 1::2]
    return torch.stack((even * cos - odd * sin, even * sin + odd * cos), dim=-1).flatten(-2)


def _rotate_half_rope(x: torch.Tensor, positions: torch.Tensor, base: float) -> torch.Tensor:
    """Hugging Face's rotary form: rotate dims i and i + D/2 together."""
    d = x.shape[-1]
    angle = positions[:, None].float() * base ** (-torch.arange(0, d, 2).float() / d)
    cos, sin = torch.cat((angle, angle), -1).cos(), torch.cat((angle, angle), -1).sin()
    rotated = torch.cat((-x[..., d // 2:], x[..., : d // 2]), -1)
    return x * cos + rotated * sin


@pytest.mark.parametrize("proj, heads", [("q_proj", 4), ("k_proj", 2)])
def test_gguf_qk_permutation_turns_hf_rope_into_llamacpp_rope(proj, heads):
    """Attention scores only need q.k per head, so llama.cpp's rope on the exported rows must give the
    HF-roped vectors in the exported row order."""
    cfg = config(rope_scaling=None)
    torch.manual_seed(0)
    weight = torch.randn(heads * 8, 32)
    x = torch.randn(5, 32)
    positions = torch.arange(5)
    exported = adapter("llama").gguf.tensor(f"model.layers.0.self_attn.{proj}.weight", weight, cfg)
    hf = _rotate_half_rope((x @ weight.T).view(5, heads, 8).transpose(0, 1), positions, 500000.0)  # (H, T, D)
    cpp = _interleaved_rope((x @ exported.T).view(5, heads, 8).transpose(0, 1), positions, 500000.0)
    hf_in_cpp_order = hf.transpose(0, 1).reshape(5, heads * 8)
    hf_in_cpp_order = adapter("llama").gguf.tensor(f"model.layers.0.self_attn.{proj}.weight", hf_in_cpp_order.T, cfg).T
    torch.testing.assert_close(cpp.transpose(0, 1).reshape(5, heads * 8), hf_in_cpp_order, atol=1e-5, rtol=1e-5)


def test_gguf_llama31_rope_factors_reproduce_hf_frequencies():
    cfg = config()
    model = LlamaForCausalLM(cfg)
    hf_inv_freq = model.model.rotary_emb.inv_freq
    extra = adapter("llama").gguf.extra_tensors(cfg)
    base = 1.0 / 500000.0 ** (torch.arange(0, 8, 2).float() / 8)
    torch.testing.assert_close(base / extra["rope_freqs.weight"], hf_inv_freq, rtol=1e-5, atol=0)
    assert adapter("llama").gguf.extra_tensors(config(rope_scaling=None)) == {}


def test_gguf_metadata():
    meta = adapter("llama").gguf.metadata(config(rope_scaling={"rope_type": "linear", "factor": 2.0}))
    assert meta == {"rope.dimension_count": 8, "rope.freq_base": 500000.0, "rope.scaling.type": "linear",
                    "rope.scaling.factor": 2.0, "vocab_size": VOCAB,
                    "attention.key_length": 8, "attention.value_length": 8}
    assert _gguf.rope_metadata(config(head_dim=16))["rope.dimension_count"] == 16


@pytest.mark.gpu
def test_bf16_on_gpu_as_close_to_fp32_as_hf(monkeypatch):
    use_backend(monkeypatch, "triton")
    assert_bf16_as_close_as_hf(LlamaForCausalLM, config(**GPU_SIZES), "llama")
