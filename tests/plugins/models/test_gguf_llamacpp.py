"""Each adapter's GGUF names, layouts and metadata, read by llama.cpp itself: a tiny random model
written with them (F32, no vocabulary) gives llama.cpp the logits transformers gives.

The sequences are shorter than the sliding windows: llama.cpp fixes Gemma 3's local/global layer
pattern itself (five local layers to one global), which a two-layer model cannot share. A variant
``family:what`` is the family with a long-context rope: YaRN (Qwen3; also with its own cos/sin
scale) or LongRoPE past its original context (Phi-3; llama.cpp picks the long factors when its
context exceeds the original one, Hugging Face when the sequence does, so the 11 tokens here pass an
original context of 8)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import Gemma2Config
from transformers import Gemma2ForCausalLM
from transformers import Gemma3ForCausalLM
from transformers import Gemma3TextConfig
from transformers import GemmaConfig
from transformers import GemmaForCausalLM
from transformers import LlamaConfig
from transformers import LlamaForCausalLM
from transformers import MistralConfig
from transformers import MistralForCausalLM
from transformers import Phi3Config
from transformers import Phi3ForCausalLM
from transformers import Qwen2Config
from transformers import Qwen2ForCausalLM
from transformers import Qwen3Config
from transformers import Qwen3ForCausalLM

from .helpers import adapter

llama_cpp = pytest.importorskip("llama_cpp")
gguf = pytest.importorskip("gguf")

VOCAB, TOKENS = 256, [1, 5, 17, 200, 33, 77, 101, 12, 9, 250, 3]
COMMON = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-6, initializer_range=0.1)
PHI3 = dict(pad_token_id=0, bos_token_id=1, eos_token_id=2, sliding_window=None, tie_word_embeddings=False)
PHI3_LONGROPE = {"rope_type": "longrope", "short_factor": [1.0 + 0.1 * i for i in range(8)],
                 "long_factor": [1.0 + 2.0 * i for i in range(8)]}
# llama.cpp scales Gemma 2/3 queries by 1/sqrt(head_dim) below 27B: query_pre_attn_scalar = head_dim matches it
MODELS = {
    "llama": lambda: LlamaForCausalLM(LlamaConfig(**COMMON, rope_parameters={
        "rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
        "high_freq_factor": 4.0, "original_max_position_embeddings": 16})),
    "qwen2": lambda: Qwen2ForCausalLM(Qwen2Config(**COMMON, tie_word_embeddings=True, rope_theta=1e6)),
    "qwen3": lambda: Qwen3ForCausalLM(Qwen3Config(**COMMON, head_dim=32, tie_word_embeddings=True, rope_theta=1e6)),
    "qwen3:yarn": lambda: Qwen3ForCausalLM(Qwen3Config(**COMMON, head_dim=32, rope_parameters={
        "rope_type": "yarn", "rope_theta": 1e6, "factor": 4.0, "original_max_position_embeddings": 16})),
    "qwen3:yarn-attention": lambda: Qwen3ForCausalLM(Qwen3Config(**COMMON, head_dim=32, rope_parameters={
        "rope_type": "yarn", "rope_theta": 1e6, "factor": 4.0, "original_max_position_embeddings": 16,
        "attention_factor": 1.5})),
    "phi3": lambda: Phi3ForCausalLM(Phi3Config(**COMMON, **PHI3)),
    "phi3:longrope": lambda: Phi3ForCausalLM(Phi3Config(**COMMON, **PHI3, original_max_position_embeddings=8,
                                                        rope_scaling=PHI3_LONGROPE)),
    "mistral": lambda: MistralForCausalLM(MistralConfig(**COMMON, head_dim=32, sliding_window=None)),
    "gemma": lambda: GemmaForCausalLM(GemmaConfig(**COMMON, head_dim=16)),
    "gemma2": lambda: Gemma2ForCausalLM(Gemma2Config(**COMMON, head_dim=16, query_pre_attn_scalar=16,
                                                     sliding_window=32, attn_logit_softcapping=5.0,
                                                     final_logit_softcapping=3.0)),
    "gemma3": lambda: Gemma3ForCausalLM(Gemma3TextConfig(**COMMON, head_dim=16, query_pre_attn_scalar=16,
                                                         sliding_window=32)),
}


def _write(model: torch.nn.Module, family: str, path) -> None:
    family = family.split(":")[0]
    ours, cfg = adapter(family), model.config
    arch = ours.gguf.architecture
    writer = gguf.GGUFWriter(str(path), arch)
    meta = {"context_length": cfg.max_position_embeddings, "embedding_length": cfg.hidden_size,
            "block_count": cfg.num_hidden_layers, "feed_forward_length": cfg.intermediate_size,
            "attention.head_count": cfg.num_attention_heads, "attention.head_count_kv": cfg.num_key_value_heads,
            "attention.layer_norm_rms_epsilon": float(cfg.rms_norm_eps), **ours.gguf.metadata(cfg)}
    for key, value in meta.items():
        kind = gguf.GGUFValueType.STRING if isinstance(value, str) else (
            gguf.GGUFValueType.FLOAT32 if isinstance(value, float) else gguf.GGUFValueType.UINT32)
        writer.add_key_value(f"{arch}.{key}", value, kind)
    writer.add_tokenizer_model("none")
    writer.add_vocab_size(VOCAB)
    for hf_name, tensor in model.state_dict().items():
        name = ours.gguf.tensor_name(hf_name)
        if name is None or (cfg.tie_word_embeddings and name == "output.weight"):
            continue
        writer.add_tensor(name, ours.gguf.tensor(hf_name, tensor.float(), cfg).numpy().astype(np.float32))
    for name, tensor in ours.gguf.extra_tensors(cfg).items():
        writer.add_tensor(name, tensor.numpy().astype(np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.mark.parametrize("family", list(MODELS))
def test_llama_cpp_reads_our_gguf_as_transformers_runs_it(family, tmp_path):
    torch.manual_seed(0)
    model = MODELS[family]().eval()
    with torch.no_grad():  # norms and biases away from their initial constants, so their layout matters
        for name, param in model.named_parameters():
            if name.endswith(("norm.weight", ".bias")):
                centre = 0.0 if "gemma" in family or name.endswith(".bias") else 1.0  # Gemma norms scale by 1 + w
                param.normal_(centre, 0.3)
        expected = model(torch.tensor([TOKENS])).logits[0].numpy()
    _write(model, family, tmp_path / "model.gguf")
    llm = llama_cpp.Llama(str(tmp_path / "model.gguf"), n_ctx=64, logits_all=True, verbose=False, n_threads=1)
    llm.eval(TOKENS)
    got = np.array(llm.scores[: len(TOKENS)])
    err = np.sqrt(((got - expected) ** 2).mean()) / np.sqrt((expected**2).mean())
    assert err < 1e-3, f"{family}: relative RMS logit error {err:.2e}"
