"""Gemma 2 adapter: patched == unpatched Hugging Face with attention and final logit softcapping, sliding
layers and pre/post feed-forward norms; GGUF metadata."""

from __future__ import annotations

import pytest
import torch
from transformers import Gemma2Config
from transformers import Gemma2ForCausalLM

from .helpers import BACKENDS
from .helpers import GPU_SIZES
from .helpers import SEQ
from .helpers import adapter
from .helpers import assert_bf16_as_close_as_hf
from .helpers import assert_equivalent
from .helpers import assert_fully_fused
from .helpers import assert_num_items_in_batch
from .helpers import tiny_pair
from .helpers import use_backend
from .test_gemma import randomize_norms

VOCAB = 128


def config(**overrides) -> Gemma2Config:
    values = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=8, max_position_embeddings=64, sliding_window=SEQ // 3,
                  query_pre_attn_scalar=16, attn_logit_softcapping=2.0, final_logit_softcapping=3.0,
                  initializer_range=0.5)  # logits large enough for both softcaps to bite
    values.update(overrides)
    cfg = Gemma2Config(**values)
    cfg._attn_implementation = "eager"  # the attention softcap needs the eager attention
    return cfg


@pytest.mark.parametrize("backend", BACKENDS)
def test_patched_matches_hf(backend, monkeypatch):
    use_backend(monkeypatch, backend)
    reference, patched, lines = tiny_pair(Gemma2ForCausalLM, config(), "gemma2")
    randomize_norms(reference)
    patched.load_state_dict(reference.state_dict())
    assert any(line.startswith("rms_norm x9 ->") for line in lines), lines  # 4 per layer + final
    assert any("final logit softcap" in line for line in lines), lines
    assert_fully_fused("gemma2", patched)
    assert_equivalent(reference, patched, VOCAB, tol=1e-5 if backend == "reference" else 1e-4)


def test_num_items_in_batch_matches_hf():
    """The grad-accumulation loss: token sum over ``num_items_in_batch``."""
    reference, patched, _ = tiny_pair(Gemma2ForCausalLM, config(), "gemma2")
    randomize_norms(reference)
    patched.load_state_dict(reference.state_dict())
    assert_num_items_in_batch(reference, patched, VOCAB)


def test_final_softcap_is_applied_by_the_fused_loss():
    """Without the softcap the fused loss would differ: the check above is sensitive to it."""
    reference, patched, _ = tiny_pair(Gemma2ForCausalLM, config(final_logit_softcapping=None), "gemma2")
    _, capped, _ = tiny_pair(Gemma2ForCausalLM, config(), "gemma2")
    capped.load_state_dict(reference.state_dict())
    from .helpers import batch

    inputs = batch(VOCAB)
    capped.train()
    patched.train()
    assert abs(capped(**inputs).loss.item() - patched(**inputs).loss.item()) > 1e-3


def test_gguf_metadata_and_names():
    cfg = config()
    gemma2 = adapter("gemma2")
    meta = gemma2.gguf.metadata(cfg)
    assert meta["attn_logit_softcapping"] == 2.0
    assert meta["final_logit_softcapping"] == 3.0
    assert meta["attention.sliding_window"] == SEQ // 3
    assert meta["attention.key_length"] == 8
    names = {n: gemma2.gguf.tensor_name(n) for n in Gemma2ForCausalLM(cfg).state_dict()}
    assert names["model.layers.1.pre_feedforward_layernorm.weight"] == "blk.1.ffn_norm.weight"
    assert names["model.layers.1.post_feedforward_layernorm.weight"] == "blk.1.post_ffw_norm.weight"
    assert names["model.layers.1.post_attention_layernorm.weight"] == "blk.1.post_attention_norm.weight"
    assert names["lm_head.weight"] is None
    assert torch.equal(gemma2.gguf.tensor("model.layers.1.pre_feedforward_layernorm.weight", torch.zeros(3), cfg),
                       torch.ones(3))


@pytest.mark.gpu
def test_bf16_on_gpu_as_close_to_fp32_as_hf(monkeypatch):
    use_backend(monkeypatch, "triton")
    assert_bf16_as_close_as_hf(Gemma2ForCausalLM, config(**GPU_SIZES), "gemma2")
