"""Qwen2 adapter: patched == unpatched Hugging Face with q/k/v biases; QLoRA; GGUF names and layout."""

from __future__ import annotations

import pytest
from transformers import Qwen2Config
from transformers import Qwen2ForCausalLM

from .helpers import BACKENDS
from .helpers import GPU_SIZES
from .helpers import adapter
from .helpers import assert_bf16_as_close_as_hf
from .helpers import assert_equivalent
from .helpers import assert_fully_fused
from .helpers import assert_num_items_in_batch
from .helpers import assert_packed_equivalent
from .helpers import assert_qlora_matches_peft
from .helpers import tiny_pair
from .helpers import use_backend

VOCAB = 128


def config(**overrides) -> Qwen2Config:
    values = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=True)
    values.update(overrides)
    cfg = Qwen2Config(**values)
    cfg._attn_implementation = "sdpa"
    return cfg


@pytest.mark.parametrize("backend", BACKENDS)
def test_patched_matches_hf(backend, monkeypatch):
    use_backend(monkeypatch, backend)
    reference, patched, _ = tiny_pair(Qwen2ForCausalLM, config(), "qwen2")
    assert patched.base_model.model.model.layers[0].self_attn.q_proj.base_layer.bias is not None
    assert_fully_fused("qwen2", patched)
    assert_equivalent(reference, patched, VOCAB, tol=1e-5 if backend == "reference" else 1e-4)


def test_loss_count_and_packing_match_hf():
    """The grad-accumulation loss (``num_items_in_batch``) and packed rows (position ids restart)."""
    reference, patched, _ = tiny_pair(Qwen2ForCausalLM, config(), "qwen2")
    assert patched.base_model.model.model.layers[0].self_attn.q_proj.base_layer.bias is not None
    assert_num_items_in_batch(reference, patched, VOCAB)
    assert_packed_equivalent(reference, patched, VOCAB)


def test_gguf_names_and_layout():
    cfg = config(tie_word_embeddings=False)
    model = Qwen2ForCausalLM(cfg)
    qwen2 = adapter("qwen2")
    names = {n: qwen2.gguf.tensor_name(n) for n in model.state_dict()}
    assert names["model.layers.1.self_attn.q_proj.bias"] == "blk.1.attn_q.bias"
    assert names["model.layers.1.self_attn.k_proj.bias"] == "blk.1.attn_k.bias"
    assert names["model.layers.1.self_attn.v_proj.weight"] == "blk.1.attn_v.weight"
    assert names["lm_head.weight"] == "output.weight"
    assert len(set(names.values())) == len(names)
    weight = model.model.layers[0].self_attn.q_proj.weight
    # llama.cpp runs Qwen2 with the rotate-half rope: no regrouping
    assert qwen2.gguf.tensor("model.layers.0.self_attn.q_proj.weight", weight, cfg) is weight
    assert qwen2.gguf.extra_tensors(cfg) == {}


def test_gguf_metadata_yarn():
    cfg = config(rope_scaling={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768},
                 rope_theta=1000000.0)
    meta = adapter("qwen2").gguf.metadata(cfg)
    assert meta["rope.freq_base"] == 1000000.0
    assert meta["rope.scaling.type"] == "yarn"
    assert meta["rope.scaling.factor"] == 4.0
    assert meta["rope.scaling.original_context_length"] == 32768
    assert meta["rope.dimension_count"] == 8


def test_qlora_nf4_matches_peft(tmp_path):
    assert_qlora_matches_peft(Qwen2ForCausalLM, config(hidden_size=64, intermediate_size=128), "qwen2", VOCAB, tmp_path)


@pytest.mark.gpu
def test_bf16_on_gpu_as_close_to_fp32_as_hf(monkeypatch):
    use_backend(monkeypatch, "triton")
    assert_bf16_as_close_as_hf(Qwen2ForCausalLM, config(**GPU_SIZES), "qwen2")
