"""The patched attention follows each RoPE scaling (``model.rope_scaling``): patched == unpatched Hugging Face
at a sequence longer than the original context, for linear, dynamic, yarn and llama3 scaling put on the
config as the engine does; and the scaling changes the model's outputs there (so it is really in play)."""

from __future__ import annotations

import pytest
import torch
from transformers import Qwen3Config
from transformers import Qwen3ForCausalLM

from ftengine.engine.rope_scaling import apply_rope_scaling

from .helpers import DEVICE
from .helpers import SEQ
from .helpers import assert_equivalent
from .helpers import batch
from .helpers import rel_err
from .helpers import tiny_pair
from .helpers import use_backend

VOCAB = 128
ORIGINAL = SEQ // 2  # the test sequences are twice the original context
SCALINGS = {
    "linear": {"rope_type": "linear", "factor": 4.0},
    "dynamic": {"rope_type": "dynamic", "factor": 4.0},
    "yarn": {"rope_type": "yarn", "factor": 4.0},
    "llama3": {"rope_type": "llama3", "factor": 4.0, "low_freq_factor": 1.0, "high_freq_factor": 2.0},
}


def config() -> Qwen3Config:
    cfg = Qwen3Config(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=ORIGINAL,
                      rope_theta=10000.0, tie_word_embeddings=True)
    cfg._attn_implementation = "sdpa"
    return cfg


# the kernels see cos/sin alone, whatever made them: one scaling on the Triton backend, on the GPU
CASES = [(kind, "reference") for kind in SCALINGS] + [pytest.param("yarn", "triton", marks=pytest.mark.gpu)]


@pytest.mark.parametrize("kind, backend", CASES)
def test_patched_follows_the_scaling_past_the_original_context(kind, backend, monkeypatch):
    use_backend(monkeypatch, backend)
    cfg = config()
    apply_rope_scaling(cfg, SCALINGS[kind])
    assert cfg.rope_parameters["rope_type"] == kind
    reference, patched, _ = tiny_pair(Qwen3ForCausalLM, cfg, "qwen3")
    assert_equivalent(reference, patched, VOCAB, tol=1e-5 if backend == "reference" else 1e-4)



def _logits(cfg: Qwen3Config) -> torch.Tensor:
    torch.manual_seed(0)
    model = Qwen3ForCausalLM(cfg).to(DEVICE, torch.float32).eval()
    with torch.no_grad():
        return model(input_ids=batch(VOCAB)["input_ids"]).logits


@pytest.mark.parametrize("kind", list(SCALINGS))
def test_the_scaling_changes_the_outputs_past_the_original_context(kind):
    """Without this the equivalence above could hold with the scaling silently ignored."""
    scaled = config()
    apply_rope_scaling(scaled, SCALINGS[kind])
    assert rel_err(_logits(config()), _logits(scaled)) > 1e-3
