"""Mistral adapter: patched == unpatched Hugging Face with a sliding window shorter than the batch; GGUF as llama."""

from __future__ import annotations

import pytest
from transformers import MistralConfig
from transformers import MistralForCausalLM

from .helpers import BACKENDS
from .helpers import GPU_SIZES
from .helpers import SEQ
from .helpers import adapter
from .helpers import assert_bf16_as_close_as_hf
from .helpers import assert_equivalent
from .helpers import assert_fully_fused
from .helpers import assert_packed_equivalent
from .helpers import tiny_pair
from .helpers import use_backend

VOCAB = 99


def config(**overrides) -> MistralConfig:
    values = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=16, max_position_embeddings=64, sliding_window=SEQ // 2)
    values.update(overrides)
    cfg = MistralConfig(**values)
    cfg._attn_implementation = "sdpa"
    return cfg


@pytest.mark.parametrize("backend", BACKENDS)
def test_patched_matches_hf(backend, monkeypatch):
    use_backend(monkeypatch, backend)
    reference, patched, _ = tiny_pair(MistralForCausalLM, config(), "mistral")
    assert_fully_fused("mistral", patched)
    assert_equivalent(reference, patched, VOCAB, tol=1e-5 if backend == "reference" else 1e-4)


def test_packed_sequences_match_hf():
    """Packed rows: position ids restart, no attention mask."""
    reference, patched, _ = tiny_pair(MistralForCausalLM, config(), "mistral")
    assert_packed_equivalent(reference, patched, VOCAB)


def test_gguf_exports_as_llama_with_explicit_head_dim():
    cfg = config()
    mistral = adapter("mistral")
    assert mistral.gguf.architecture == "llama"
    assert mistral.gguf.tensor_name("model.layers.1.mlp.down_proj.weight") == "blk.1.ffn_down.weight"
    meta = mistral.gguf.metadata(cfg)
    assert meta["attention.key_length"] == 16 and meta["rope.dimension_count"] == 16
    q = MistralForCausalLM(cfg).model.layers[0].self_attn.q_proj.weight
    exported = mistral.gguf.tensor("model.layers.0.self_attn.q_proj.weight", q, cfg)
    assert exported.shape == q.shape and not exported.equal(q)
    assert exported[1].equal(q[8])  # head 0: row 2i+1 of the export is row D/2 + i of Hugging Face's


@pytest.mark.gpu
def test_bf16_on_gpu_as_close_to_fp32_as_hf(monkeypatch):
    use_backend(monkeypatch, "triton")
    assert_bf16_as_close_as_hf(MistralForCausalLM, config(**GPU_SIZES), "mistral")
