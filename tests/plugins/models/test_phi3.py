"""Phi-3 adapter: patched == unpatched Hugging Face with LoRA on the fused ``qkv_proj`` / ``gate_up_proj``,
LongRoPE with the short and the long factors, the sliding window, partial rotary (Phi-4-mini); QLoRA; GGUF
names, LongRoPE keys and factor tensors."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import Phi3Config
from transformers import Phi3ForCausalLM

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

VOCAB = 128


def longrope(original: int, rotary_dim: int = 8) -> dict:
    """LongRoPE parameters with distinct short and long factors (one per rotary frequency)."""
    half = rotary_dim // 2
    return {"rope_type": "longrope", "short_factor": [1.0 + 0.25 * i for i in range(half)],
            "long_factor": [2.0 + 3.0 * i for i in range(half)], "original_max_position_embeddings": original}


def config(**overrides) -> Phi3Config:
    values = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=64, original_max_position_embeddings=64,
                  sliding_window=None, resid_pdrop=0.0, embd_pdrop=0.0, attention_dropout=0.0, pad_token_id=0,
                  bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
    values.update(overrides)
    cfg = Phi3Config(**values)
    cfg._attn_implementation = "sdpa"
    return cfg


def long_context_config(original: int, **overrides) -> Phi3Config:
    """A 128k-style config: LongRoPE over an original context of ``original`` tokens."""
    return config(original_max_position_embeddings=original, rope_scaling=longrope(original), **overrides)


@pytest.mark.parametrize("backend", BACKENDS)
def test_patched_matches_hf(backend, monkeypatch):
    use_backend(monkeypatch, backend)
    reference, patched, lines = tiny_pair(Phi3ForCausalLM, config(), "phi3")
    assert any("qkv_proj x2 -> lora_linear" in line for line in lines), lines
    assert any("gate_up_proj x2 -> lora_linear" in line for line in lines), lines
    assert_fully_fused("phi3", patched)
    assert adapter("phi3").routes(patched) == ["fused lora x8"]
    assert_equivalent(reference, patched, VOCAB, tol=1e-5 if backend == "reference" else 1e-4)


@pytest.mark.parametrize("original", [SEQ // 2, 2 * SEQ], ids=["long-factors", "short-factors"])
def test_longrope_matches_hf(original):
    """LongRoPE: Hugging Face's rotary module uses the long factors once the sequence passes the original
    context, the short ones below it, and scales cos/sin by the attention factor."""
    cfg = long_context_config(original)
    reference, patched, _ = tiny_pair(Phi3ForCausalLM, cfg, "phi3")
    assert_equivalent(reference, patched, VOCAB)
    rotary = patched.base_model.model.model.rotary_emb
    base = 1.0 / 10000.0 ** (torch.arange(0, 8, 2).float() / 8)
    factors = cfg.rope_parameters["long_factor" if original < SEQ else "short_factor"]
    torch.testing.assert_close(rotary.inv_freq, base / torch.tensor(factors), rtol=1e-5, atol=0)


@pytest.mark.parametrize("backend", ["reference", pytest.param("triton", marks=pytest.mark.gpu)])
def test_sliding_window_and_partial_rotary_match_hf(backend, monkeypatch):
    """Phi-3-mini's sliding window (shorter than the sequence here) and Phi-4-mini's partial rotary (3/4 of
    each head turns: the rope op gets a strided slice of each head), with LongRoPE over the rotary part."""
    use_backend(monkeypatch, backend)
    cfg = config(sliding_window=SEQ // 3, partial_rotary_factor=0.75, original_max_position_embeddings=SEQ // 2,
                 rope_scaling=longrope(SEQ // 2, rotary_dim=6))
    reference, patched, _ = tiny_pair(Phi3ForCausalLM, cfg, "phi3")
    assert_equivalent(reference, patched, VOCAB, tol=1e-5 if backend == "reference" else 1e-4)


def test_loss_count_and_packing_match_hf():
    reference, patched, _ = tiny_pair(Phi3ForCausalLM, config(), "phi3")
    assert_num_items_in_batch(reference, patched, VOCAB)
    assert_packed_equivalent(reference, patched, VOCAB)


def test_qlora_nf4_matches_peft(tmp_path):
    """NF4 bases of the fused projections."""
    assert_qlora_matches_peft(Phi3ForCausalLM, config(hidden_size=64, intermediate_size=128), "phi3", VOCAB, tmp_path)


def test_gguf_names_metadata_and_longrope_tensors():
    cfg = config(max_position_embeddings=128, original_max_position_embeddings=16, rope_scaling=longrope(16),
                 sliding_window=48)
    phi3 = adapter("phi3")
    names = {n: phi3.gguf.tensor_name(n) for n in Phi3ForCausalLM(cfg).state_dict()}
    assert names["model.layers.1.self_attn.qkv_proj.weight"] == "blk.1.attn_qkv.weight"
    assert names["model.layers.1.mlp.gate_up_proj.weight"] == "blk.1.ffn_up.weight"
    assert names["model.layers.1.mlp.down_proj.weight"] == "blk.1.ffn_down.weight"
    assert names["lm_head.weight"] == "output.weight"
    assert len(set(names.values())) == len(names)
    meta = phi3.gguf.metadata(cfg)
    assert meta["attention.sliding_window"] == 48
    assert meta["rope.scaling.original_context_length"] == 16
    assert meta["rope.scaling.attn_factor"] == pytest.approx(math.sqrt(1 + math.log(128 / 16) / math.log(16)))
    assert meta["rope.dimension_count"] == 8
    extra = phi3.gguf.extra_tensors(cfg)
    assert extra["rope_factors_long.weight"].tolist() == cfg.rope_parameters["long_factor"]
    assert extra["rope_factors_short.weight"].tolist() == cfg.rope_parameters["short_factor"]
    plain = phi3.gguf.metadata(config())
    assert plain["attention.sliding_window"] == 0 and "rope.scaling.attn_factor" not in plain  # Phi-4: no window
    assert phi3.gguf.extra_tensors(config()) == {}
    assert phi3.gguf.metadata(config(partial_rotary_factor=0.75))["rope.dimension_count"] == 6


@pytest.mark.gpu
def test_bf16_on_gpu_as_close_to_fp32_as_hf(monkeypatch):
    use_backend(monkeypatch, "triton")
    sizes = {k: v for k, v in GPU_SIZES.items() if k != "head_dim"}
    assert_bf16_as_close_as_hf(Phi3ForCausalLM, config(**sizes, original_max_position_embeddings=512), "phi3")
