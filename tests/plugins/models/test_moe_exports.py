"""Mixture-of-experts exports read by their real consumers: a tiny Qwen3-MoE (unpatched) / Mixtral
(patched) with LoRA on the attention, every expert and the router (through the Python API) is
exported merged, reloaded by transformers, and exported to GGUF, run by llama.cpp; both give the
in-memory model's logits."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM
from transformers import AutoTokenizer
from transformers import MixtralConfig
from transformers import MixtralForCausalLM
from transformers import Qwen3MoeConfig
from transformers import Qwen3MoeForCausalLM

import ftengine
from ftengine.core.kernels import get_op
from ftengine.demo import ASSETS

from .helpers import adapter

VOCAB = 640  # the demo tokenizer's
TOKENS = [1, 5, 17, 200, 33, 77, 101, 12, 9, 250, 3, 600]
COMMON = dict(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
              max_position_embeddings=64, rms_norm_eps=1e-6, initializer_range=0.1, num_experts_per_tok=2)
MODELS = {
    "qwen3_moe": lambda: Qwen3MoeForCausalLM(Qwen3MoeConfig(**COMMON, intermediate_size=128, moe_intermediate_size=64,
                                                            num_experts=4, head_dim=16, norm_topk_prob=True,
                                                            rope_theta=1e6)),
    "mixtral": lambda: MixtralForCausalLM(MixtralConfig(**COMMON, intermediate_size=64, num_local_experts=4,
                                                        rope_theta=1e4)),
}


@pytest.fixture(params=list(MODELS))
def trained(request):
    """``(model with LoRA, tokenizer, logits of TOKENS)``; LoRA B non-zero so every adapter changes the output."""
    torch.manual_seed(0)
    base = MODELS[request.param]()
    with torch.no_grad():
        for name, param in base.named_parameters():
            if name.endswith("norm.weight"):
                param.normal_(1.0, 0.3)
    if request.param == "mixtral":  # exports read the weights, whether or not the forwards are patched
        adapter(request.param).patch(base, get_op)
    model = ftengine.add_lora(base, r=4, lora_alpha=8, target_modules=[
        *adapter(request.param).default_target_modules, "gate"],
        use_gradient_checkpointing=False)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.1)
    assert any(".experts." in n and "lora_A" in n for n, _ in model.named_parameters())
    assert any(".mlp.gate." in n and "lora_A" in n for n, _ in model.named_parameters())
    model.eval()
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([TOKENS])).logits[0].float()
    return model, AutoTokenizer.from_pretrained(str(ASSETS / "tokenizer")), logits


def _rel_rms(got: np.ndarray, expected: np.ndarray) -> float:
    return float(np.sqrt(((got - expected) ** 2).mean() / (expected**2).mean()))


def test_merged_export_reloads_with_transformers(trained, tmp_path):
    model, tokenizer, expected = trained
    out = ftengine.export(model, tokenizer, str(tmp_path / "merged"), format="merged", dtype="float16")
    reloaded = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
    with torch.no_grad():
        got = reloaded(input_ids=torch.tensor([TOKENS])).logits[0]
    assert _rel_rms(got.numpy(), expected.numpy()) < 2e-3


def test_gguf_export_runs_in_llama_cpp(trained, tmp_path):
    llama_cpp = pytest.importorskip("llama_cpp")
    model, tokenizer, expected = trained
    out = ftengine.export(model, tokenizer, str(tmp_path / "gguf"), format="gguf", quantization="f32")
    llm = llama_cpp.Llama(str(out / "model-f32.gguf"), n_ctx=64, logits_all=True, verbose=False, n_threads=1)
    llm.eval(TOKENS)
    got = np.array(llm.scores[: len(TOKENS)])
    llm.close()
    assert _rel_rms(got, expected.numpy()) < 1e-3
