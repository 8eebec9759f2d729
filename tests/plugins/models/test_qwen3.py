"""Qwen3 adapter: patched == unpatched Hugging Face (q/k head norms before rope, explicit head_dim, tied
embeddings, sliding layers); QLoRA; GGUF names and metadata."""

from __future__ import annotations

import pytest
import torch
from transformers import Qwen3Config
from transformers import Qwen3ForCausalLM

from .helpers import BACKENDS
from .helpers import GPU_SIZES
from .helpers import SEQ
from .helpers import adapter
from .helpers import assert_bf16_as_close_as_hf
from .helpers import assert_equivalent
from .helpers import assert_fully_fused
from .helpers import assert_num_items_in_batch
from .helpers import assert_packed_equivalent
from .helpers import assert_qlora_matches_peft
from .helpers import tiny_pair
from .helpers import use_backend
from .test_gemma import randomize_norms

VOCAB = 128


def config(**overrides) -> Qwen3Config:
    # head_dim 16 > hidden_size / heads = 8, as on the small Qwen3 sizes
    values = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=16, max_position_embeddings=64, tie_word_embeddings=True,
                  rope_theta=1000000.0)
    values.update(overrides)
    cfg = Qwen3Config(**values)
    cfg._attn_implementation = "sdpa"
    return cfg


def _pair(cfg: Qwen3Config):
    reference, patched, lines = tiny_pair(Qwen3ForCausalLM, cfg, "qwen3")
    randomize_norms(reference)  # q/k norms away from ones, so applying them (or not) shows
    patched.load_state_dict(reference.state_dict())
    return reference, patched, lines


@pytest.mark.parametrize("backend", BACKENDS)
def test_patched_matches_hf(backend, monkeypatch):
    use_backend(monkeypatch, backend)
    reference, patched, lines = _pair(config())
    assert any(line.startswith("rms_norm x9 ->") for line in lines), lines  # 2 + q/k per layer, final
    assert patched.base_model.model.model.layers[0].self_attn.q_proj.base_layer.bias is None
    assert_fully_fused("qwen3", patched)
    assert_equivalent(reference, patched, VOCAB, tol=1e-5 if backend == "reference" else 1e-4)


def test_sliding_layers_untied_match_hf():
    """The upper layer slides (window shorter than the sequence) and the head is untied."""
    cfg = config(use_sliding_window=True, sliding_window=SEQ // 3, max_window_layers=1, tie_word_embeddings=False)
    assert cfg.layer_types == ["full_attention", "sliding_attention"]
    reference, patched, _ = _pair(cfg)
    assert_equivalent(reference, patched, VOCAB)


def test_loss_count_and_packing_match_hf():
    reference, patched, _ = _pair(config())
    assert_num_items_in_batch(reference, patched, VOCAB)
    assert_packed_equivalent(reference, patched, VOCAB)


def test_qlora_nf4_matches_peft(tmp_path):
    assert_qlora_matches_peft(Qwen3ForCausalLM, config(hidden_size=64, intermediate_size=128), "qwen3", VOCAB, tmp_path)


def test_gguf_names_and_metadata():
    cfg = config(tie_word_embeddings=False, rope_scaling={"rope_type": "yarn", "factor": 4.0,
                                                          "original_max_position_embeddings": 16})
    qwen3 = adapter("qwen3")
    names = {n: qwen3.gguf.tensor_name(n) for n in Qwen3ForCausalLM(cfg).state_dict()}
    assert names["model.layers.1.self_attn.q_norm.weight"] == "blk.1.attn_q_norm.weight"
    assert names["model.layers.1.self_attn.k_norm.weight"] == "blk.1.attn_k_norm.weight"
    assert names["model.layers.0.self_attn.q_proj.weight"] == "blk.0.attn_q.weight"
    assert names["lm_head.weight"] == "output.weight"
    assert len(set(names.values())) == len(names)
    weight = torch.randn(64, 32)
    assert qwen3.gguf.tensor("model.layers.0.self_attn.k_proj.weight", weight, cfg) is weight  # rotate-half rope
    meta = qwen3.gguf.metadata(cfg)
    assert meta["rope.dimension_count"] == 16 and meta["attention.key_length"] == 16
    assert meta["rope.freq_base"] == 1000000.0
    assert (meta["rope.scaling.type"], meta["rope.scaling.factor"]) == ("yarn", 4.0)
    assert meta["rope.scaling.original_context_length"] == 16
    assert qwen3.gguf.extra_tensors(cfg) == {}


@pytest.mark.gpu
def test_bf16_on_gpu_as_close_to_fp32_as_hf(monkeypatch):
    use_backend(monkeypatch, "triton")
    assert_bf16_as_close_as_hf(Qwen3ForCausalLM, config(**GPU_SIZES), "qwen3")
