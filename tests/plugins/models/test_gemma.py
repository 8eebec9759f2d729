"""Gemma adapter: patched == unpatched Hugging Face ((1 + w) norms, tanh-GELU gate); GGUF names and norm shift."""

from __future__ import annotations

import pytest
import torch
from transformers import GemmaConfig
from transformers import GemmaForCausalLM

from .helpers import BACKENDS
from .helpers import GPU_SIZES
from .helpers import adapter
from .helpers import assert_bf16_as_close_as_hf
from .helpers import assert_equivalent
from .helpers import assert_fully_fused
from .helpers import assert_num_items_in_batch
from .helpers import tiny_pair
from .helpers import use_backend

VOCAB = 128


def config(**overrides) -> GemmaConfig:
    values = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=1, head_dim=8, max_position_embeddings=64)
    values.update(overrides)
    cfg = GemmaConfig(**values)
    cfg._attn_implementation = "sdpa"
    return cfg


def randomize_norms(model) -> None:
    """Gemma norms start at zero (the scale is 1 + w); random values make the offset matter."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.normal_(0.0, 0.5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_patched_matches_hf(backend, monkeypatch):
    use_backend(monkeypatch, backend)
    reference, patched, lines = tiny_pair(GemmaForCausalLM, config(), "gemma")
    randomize_norms(reference)
    patched.load_state_dict(reference.state_dict())
    assert any("lora_mlp geglu_tanh" in line for line in lines), lines
    assert_fully_fused("gemma", patched)
    assert_equivalent(reference, patched, VOCAB, tol=1e-5 if backend == "reference" else 1e-4)


def test_num_items_in_batch_matches_hf():
    """The grad-accumulation loss: token sum over ``num_items_in_batch``."""
    reference, patched, _ = tiny_pair(GemmaForCausalLM, config(), "gemma")
    randomize_norms(reference)
    patched.load_state_dict(reference.state_dict())
    assert_num_items_in_batch(reference, patched, VOCAB)


def test_gguf_names_norm_shift_and_tied_head():
    cfg = config()
    gemma = adapter("gemma")
    model = GemmaForCausalLM(cfg)
    names = {n: gemma.gguf.tensor_name(n) for n in model.state_dict()}
    assert names["lm_head.weight"] is None  # llama.cpp reuses token_embd
    assert names["model.layers.0.post_attention_layernorm.weight"] == "blk.0.ffn_norm.weight"
    exported = {n for n in names.values() if n is not None}
    assert len(exported) == len(names) - 1
    norm = torch.randn(32)
    assert torch.equal(gemma.gguf.tensor("model.norm.weight", norm, cfg), norm + 1)
    q = torch.randn(32, 32)
    assert gemma.gguf.tensor("model.layers.0.self_attn.q_proj.weight", q, cfg) is q
    assert gemma.gguf.metadata(cfg)["attention.key_length"] == 8


@pytest.mark.gpu
def test_bf16_on_gpu_as_close_to_fp32_as_hf(monkeypatch):
    use_backend(monkeypatch, "triton")
    assert_bf16_as_close_as_hf(GemmaForCausalLM, config(**GPU_SIZES), "gemma")
