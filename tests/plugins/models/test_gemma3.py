"""Gemma 3 adapter: patched == unpatched Hugging Face for the text model (q/k norms, local and global
layers with their own rope) and for the text path of the multimodal model; GGUF names and metadata."""

from __future__ import annotations

import pytest
import torch
from transformers import Gemma3Config
from transformers import Gemma3ForCausalLM
from transformers import Gemma3ForConditionalGeneration
from transformers import Gemma3TextConfig
from transformers import SiglipVisionConfig

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
from .test_gemma import randomize_norms

VOCAB = 128


def text_config(**overrides) -> Gemma3TextConfig:
    values = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=8, max_position_embeddings=64, sliding_window=SEQ // 3,
                  layer_types=["sliding_attention", "full_attention"], query_pre_attn_scalar=16,
                  rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                                   "full_attention": {"rope_type": "linear", "factor": 8.0,
                                                      "rope_theta": 1000000.0}},
                  initializer_range=0.2)
    values.update(overrides)
    cfg = Gemma3TextConfig(**values)
    cfg._attn_implementation = "sdpa"
    return cfg


def multimodal_config() -> Gemma3Config:
    vision = SiglipVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                                image_size=28, patch_size=14)
    cfg = Gemma3Config(text_config=text_config(), vision_config=vision, mm_tokens_per_image=1)
    cfg._attn_implementation = "sdpa"
    cfg.text_config._attn_implementation = "sdpa"
    return cfg


@pytest.mark.parametrize("backend", BACKENDS)
def test_text_model_patched_matches_hf(backend, monkeypatch):
    use_backend(monkeypatch, backend)
    reference, patched, lines = tiny_pair(Gemma3ForCausalLM, text_config(), "gemma3")
    randomize_norms(reference)
    patched.load_state_dict(reference.state_dict())
    assert any(line.startswith("rms_norm x13 ->") for line in lines), lines  # 4 + q/k per layer, final
    assert_fully_fused("gemma3", patched)
    assert_equivalent(reference, patched, VOCAB, tol=1e-5 if backend == "reference" else 1e-4)


def test_packed_sequences_match_hf():
    """Packed rows: position ids restart, no attention mask."""
    reference, patched, _ = tiny_pair(Gemma3ForCausalLM, text_config(), "gemma3")
    randomize_norms(reference)
    patched.load_state_dict(reference.state_dict())
    assert_packed_equivalent(reference, patched, VOCAB)


def test_multimodal_model_text_path_matches_hf():
    # the SigLIP tower has q/k/v_proj too; text-only batches give its adapters no gradient, so train the text side
    text_side = r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"
    reference, patched, lines = tiny_pair(Gemma3ForConditionalGeneration, multimodal_config(), "gemma3",
                                          target_modules=text_side)
    assert any(line.startswith("causal-LM loss") for line in lines), lines
    assert_fully_fused("gemma3", patched)
    assert_equivalent(reference, patched, VOCAB)


def test_gguf_names_and_metadata():
    gemma3 = adapter("gemma3")
    cfg = multimodal_config()
    names = {n: gemma3.gguf.tensor_name(n) for n in Gemma3ForConditionalGeneration(cfg).state_dict()}
    assert names["model.language_model.embed_tokens.weight"] == "token_embd.weight"
    assert names["model.language_model.layers.1.self_attn.q_norm.weight"] == "blk.1.attn_q_norm.weight"
    assert names["model.language_model.layers.1.self_attn.k_norm.weight"] == "blk.1.attn_k_norm.weight"
    assert names["model.language_model.norm.weight"] == "output_norm.weight"
    assert names["model.vision_tower.encoder.layers.0.mlp.fc1.weight"] is None
    assert names["model.multi_modal_projector.mm_soft_emb_norm.weight"] is None
    assert gemma3.gguf.tensor_name("language_model.model.layers.0.mlp.up_proj.weight") == "blk.0.ffn_up.weight"
    assert torch.equal(gemma3.gguf.tensor("model.language_model.layers.0.self_attn.k_norm.weight",
                                          torch.zeros(2), cfg), torch.ones(2))
    meta = gemma3.gguf.metadata(cfg)
    assert meta["rope.freq_base"] == 1000000.0  # the global layers'
    assert meta["rope.scaling.type"] == "linear" and meta["rope.scaling.factor"] == 8.0
    assert meta["attention.sliding_window"] == SEQ // 3
    assert meta["attention.key_length"] == 8
    assert "final_logit_softcapping" not in meta
    no_window = gemma3.gguf.metadata(text_config(layer_types=["full_attention", "full_attention"]))
    assert "attention.sliding_window" not in no_window


@pytest.mark.gpu
def test_bf16_on_gpu_as_close_to_fp32_as_hf(monkeypatch):
    use_backend(monkeypatch, "triton")
    assert_bf16_as_close_as_hf(Gemma3ForCausalLM, text_config(**GPU_SIZES), "gemma3")


def test_multimodal_model_with_images_matches_hf():
    """Images in the batch: SigLIP tower (HF's code, LoRA on it) -> projector -> patched language tower."""
    cfg = multimodal_config()
    cfg.vision_config.vision_use_head = False  # as in Gemma 3's checkpoints
    cfg.image_token_id, cfg.boi_token_id, cfg.eoi_token_id = 120, 121, 122
    targets = adapter("gemma3").vision.target_modules()
    reference, patched, lines = tiny_pair(Gemma3ForConditionalGeneration, cfg, "gemma3", target_modules=targets)
    assert lines[0].startswith("rms_norm x13 ->"), lines  # the language tower's only
    assert any(".vision_tower." in n and "lora_" in n for n, _ in patched.named_parameters())
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(0, 100, (2, SEQ), generator=g)
    ids[:, 3] = 121
    ids[:, 4] = 120  # mm_tokens_per_image=1: one image token per image
    ids[:, 5] = 122
    labels = ids.clone()
    labels[:, :6] = -100
    pixels = torch.randn(2, 3, 28, 28, generator=g)
    assert_equivalent(reference, patched, VOCAB, input_ids=ids, labels=labels, attention_mask=torch.ones_like(ids),
                      pixel_values=pixels, token_type_ids=(ids == 120).long())
