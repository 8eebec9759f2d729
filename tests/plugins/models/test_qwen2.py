"""Qwen2 adapter: patched == unpatched Hugging Face with q/k/v biases; QLoRA; GGUF names and layout."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig
from peft import get_peft_model
from transformers import Qwen2Config
from transformers import Qwen2ForCausalLM

from ftengine.core.kernels import get_op

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
    """bitsandbytes' CPU dequantization is wrong for rows shorter than a 64-value block (0.50.2), so every
    projection here has at least 64 inputs. In eval mode without gradients bitsandbytes switches to a bf16
    CPU kernel, so the eval logits are compared at bf16's precision."""
    from transformers import BitsAndBytesConfig

    torch.manual_seed(0)
    Qwen2ForCausalLM(config(hidden_size=64, intermediate_size=128)).save_pretrained(tmp_path)
    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32,
                               bnb_4bit_use_double_quant=True)
    models = [Qwen2ForCausalLM.from_pretrained(tmp_path, quantization_config=quant, dtype=torch.float32)
              for _ in range(2)]
    assert adapter("qwen2").patch(models[1], get_op)

    lora = LoraConfig(r=4, lora_alpha=8, init_lora_weights=False, target_modules="all-linear")
    torch.manual_seed(1)
    reference = get_peft_model(models[0], lora)
    patched = get_peft_model(models[1], LoraConfig(**lora.to_dict()))
    patched.load_state_dict(reference.state_dict(), strict=False)
    assert_fully_fused("qwen2", patched, kind="lora+nf4")
    assert_equivalent(reference, patched, VOCAB, tol=1e-5, eval_tol=1e-2)


@pytest.mark.gpu
def test_bf16_on_gpu_as_close_to_fp32_as_hf(monkeypatch):
    use_backend(monkeypatch, "triton")
    assert_bf16_as_close_as_hf(Qwen2ForCausalLM, config(**GPU_SIZES), "qwen2")
