"""The patched forwards: decode steps on the modules' own forwards."""

import collections

import pytest
import torch
from transformers import Qwen2Config
from transformers import Qwen2ForCausalLM

from ftengine.core import kernels
from ftengine.plugins.models._patching import DECODE_ROWS
from tests.plugins.models.helpers import counting_resolve_op
from tests.plugins.models.helpers import tiny_pair

VOCAB = 128


@pytest.fixture
def op_calls(monkeypatch):
    """Every call of a resolved kernel op, counted by name."""
    calls = collections.Counter()
    monkeypatch.setattr(kernels, "resolve_op", counting_resolve_op(calls))
    return calls


def test_few_rows_without_autograd_run_the_modules_own_forwards(op_calls):
    """A decode step (one row a sequence, no autograd) is transformers' own computation, bit for bit; many rows
    without autograd, and any forward with it, take the fused ops."""
    config = Qwen2Config(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=256)
    reference, patched, _ = tiny_pair(Qwen2ForCausalLM, config, "qwen2")
    reference.eval()
    patched.eval()
    decode = torch.randint(0, VOCAB, (8, 1))
    prompt = torch.randint(0, VOCAB, (2, DECODE_ROWS))  # 2 x 64 rows: more than a decode step
    with torch.no_grad():
        assert torch.equal(patched(input_ids=decode).logits, reference(input_ids=decode).logits)
        assert not op_calls
        logits = patched(input_ids=prompt).logits
        torch.testing.assert_close(logits, reference(input_ids=prompt).logits, rtol=1e-4, atol=1e-4)
    assert op_calls["lora_mlp"] == 2 and op_calls["lora_qkv"] == 2 and op_calls["rms_norm"] == 5
    op_calls.clear()
    patched(input_ids=decode).logits.sum().backward()
    assert op_calls["lora_mlp"] == 2 and op_calls["rms_norm"] == 5
