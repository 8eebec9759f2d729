"""Gradient checkpointing modes: the LoRA gradients equal the un-checkpointed ones, and the layers that
should recompute do (their MLP runs twice a step)."""

from __future__ import annotations

import copy

import pytest
import torch
from peft import LoraConfig
from peft import get_peft_model
from transformers import LlamaConfig
from transformers import LlamaForCausalLM

from ftengine.engine.memory.checkpointing import apply_gradient_checkpointing
from ftengine.engine.memory.checkpointing import decoder_layers
from ftengine.engine.memory.checkpointing import release_host_buffers

TOKENS, HIDDEN = 2 * 12, 32
# per token and layer, in values: (6*32 + 2*16 + 3*64) * 1.25 = 520 without checkpointing, 32 with; fp32
FULL, KEPT = 520 * TOKENS * 4, HIDDEN * TOKENS * 4


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny matmuls: more intra-op threads only add synchronisation."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def base():
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=99, hidden_size=HIDDEN, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=1, max_position_embeddings=64)
    lora = LoraConfig(r=4, lora_alpha=8, init_lora_weights=False, target_modules="all-linear")
    return get_peft_model(LlamaForCausalLM(cfg), lora)


def _step(model, device: str = "cpu") -> tuple[dict[str, torch.Tensor], list[int]]:
    """One training step's LoRA gradients and how often each layer's MLP started (a recompute stops once it has
    rebuilt what the backward needs, so the start is what to count)."""
    calls = []
    hooks = []
    for index, layer in enumerate(decoder_layers(model)):
        calls.append(0)
        hooks.append(layer.mlp.register_forward_pre_hook(lambda *_, i=index: calls.__setitem__(i, calls[i] + 1)))
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 99, (2, 12), generator=g).to(device)
    model.to(device).train()
    model(input_ids=ids, labels=ids).loss.backward()
    for hook in hooks:
        hook.remove()
    return {n: p.grad.cpu() for n, p in model.named_parameters() if p.requires_grad}, calls


@pytest.mark.parametrize("mode, budget, recomputed, described", [
    (True, None, [2, 2], "standard (non-reentrant) on 2 layers"),
    ("offload", None, [2, 2], "offload: 2 layers"),
    ("auto", 0, [2, 2], "auto"),
    ("auto", FULL + KEPT + 8, [2, 1], "auto"),
    ("auto", 2 * FULL, [1, 1], "auto"),
    ("off", None, [1, 1], "off"),
])
def test_gradients_match_without_checkpointing(base, mode, budget, recomputed, described):
    expected, calls = _step(copy.deepcopy(base))
    assert calls == [1, 1]
    model = copy.deepcopy(base)
    assert apply_gradient_checkpointing(model, mode, memory_budget_bytes=budget).startswith(described)
    grads, calls = _step(model)
    assert calls == recomputed
    assert grads.keys() == expected.keys()
    for name in grads:
        torch.testing.assert_close(grads[name], expected[name], rtol=1e-6, atol=1e-7, msg=name)


def test_unknown_mode_is_an_error(base):
    with pytest.raises(ValueError, match="expected one of: off, true, offload, auto"):
        apply_gradient_checkpointing(copy.deepcopy(base), "sometimes")


def test_release_host_buffers_empties_the_offloaders_cache(base):
    model = copy.deepcopy(base)
    apply_gradient_checkpointing(model, "offload")
    offloader = decoder_layers(model)[0]._gradient_checkpointing_func.__self__
    assert all(layer._gradient_checkpointing_func.__self__ is offloader for layer in decoder_layers(model))
    offloader.buffers.free[64] = [torch.empty(64, dtype=torch.uint8)]
    release_host_buffers(model)
    assert offloader.buffers.cached_bytes() == 0


@pytest.mark.gpu
@pytest.mark.parametrize("mode", [True, "offload", "auto"])
def test_gradients_match_on_gpu(base, mode):
    expected, _ = _step(copy.deepcopy(base), "cuda")
    model = copy.deepcopy(base).cuda()
    apply_gradient_checkpointing(model, mode, memory_budget_bytes=0 if mode == "auto" else None)
    grads, calls = _step(model, "cuda")
    assert calls == [2, 2]
    for name in grads:
        torch.testing.assert_close(grads[name], expected[name], rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("mode", [True, "offload"])
def test_fused_ops_recompute_only_what_the_backward_reads(base, mode, monkeypatch):
    # the patched model (Triton ops): the recomputed MLP keeps g and u but skips its activation and down
    # projection (the activation runs once per layer, in the first forward); gradients unchanged
    from ftengine.core.kernels import get_op
    from ftengine.core.plugins import adapter_for_model_type
    from ftengine.core.plugins import get_registry
    from ftengine.plugins.kernels.triton import lora_mlp

    if not get_registry("kernels")["triton"].available():
        pytest.skip("no Triton backend here")
    monkeypatch.setenv("FTENGINE_KERNELS", "triton")
    patched = copy.deepcopy(base)
    adapter_for_model_type("llama").patch(patched, get_op)
    expected, _ = _step(copy.deepcopy(patched))
    apply_gradient_checkpointing(patched, mode)
    activations, act_forward = [], lora_mlp._act_forward
    monkeypatch.setattr(lora_mlp, "_act_forward", lambda *a: activations.append(1) or act_forward(*a))
    grads, calls = _step(patched)
    assert calls == [2, 2] and len(activations) == 2
    for name in grads:
        torch.testing.assert_close(grads[name], expected[name], rtol=1e-5, atol=1e-6, msg=name)
