"""The input embedding in device-mapped host memory: the same logits and LoRA gradients, no GPU
memory for the table, clear refusals where it cannot work."""

from __future__ import annotations

import copy

import pytest
import torch
from peft import LoraConfig
from peft import get_peft_model
from transformers import LlamaConfig
from transformers import LlamaForCausalLM

import ftengine
from ftengine.core.errors import ConfigError
from ftengine.engine.memory.embedding_offload import is_in_host_memory
from ftengine.engine.memory.embedding_offload import offload_input_embedding


def _lora_model(tied: bool = False, modules_to_save: list[str] | None = None):
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=tied)
    lora = LoraConfig(r=4, lora_alpha=8, init_lora_weights=False, target_modules="all-linear",
                      modules_to_save=modules_to_save)
    return get_peft_model(LlamaForCausalLM(cfg), lora)


def _step(model, device: str) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    ids = torch.randint(0, 97, (2, 11), generator=torch.Generator().manual_seed(1)).to(device)
    out = model(input_ids=ids, labels=ids)
    out.loss.backward()
    grads = {n: p.grad.cpu() for n, p in model.named_parameters() if p.requires_grad}
    return out.logits.detach().cpu(), grads


def test_a_model_in_host_memory_has_nothing_to_offload():
    model = _lora_model()
    assert offload_input_embedding(model) == "input embedding: nothing to offload (the model is on cpu)"
    assert not is_in_host_memory(model.get_input_embeddings().weight)


@pytest.mark.parametrize("kwargs, message", [
    (dict(tied=True), "tied to the LM head"),
    (dict(modules_to_save=["embed_tokens"]), "the input embedding is trained"),
])
def test_refusals(kwargs, message):
    with pytest.raises(ValueError, match=message):
        offload_input_embedding(_lora_model(**kwargs))


def test_refuses_a_model_spread_over_devices():
    model = _lora_model()
    model.base_model.model.hf_device_map = {"model.embed_tokens": 0, "model.layers": 1, "lm_head": 1}
    with pytest.raises(ValueError, match="spread over devices"):
        offload_input_embedding(model)


def test_python_api_reports_the_tied_demo_embedding(demo_base):
    model, _ = ftengine.load_model(str(demo_base), dtype="float32", offload_embedding=True)
    with pytest.raises(ConfigError, match="tied to the LM head"):
        ftengine.add_lora(model, r=4, use_gradient_checkpointing=False)


def test_full_finetuning_cannot_offload_the_embedding(demo_base):
    with pytest.raises(ConfigError, match="full fine-tuning trains the embedding"):
        ftengine.load_model(str(demo_base), full_finetuning=True, offload_embedding=True)


def test_the_run_config_key_reaches_the_model(tiny_config):
    from ftengine.engine import pipeline

    config = tiny_config()
    config.model = config.model.model_copy(update={"offload_embedding": True})
    with pytest.raises(ConfigError, match="model.offload_embedding: the input embedding is tied"):
        pipeline.run(config)


@pytest.mark.gpu
def test_on_gpu_the_table_leaves_the_device_and_training_is_unchanged():
    reference = _lora_model().cuda()
    model = copy.deepcopy(reference)
    before = torch.cuda.memory_allocated()
    table = model.get_input_embeddings().weight
    size = table.numel() * table.element_size()
    assert offload_input_embedding(model).startswith("input embedding: 0.00 GiB in host memory")
    assert before - torch.cuda.memory_allocated() == -(-size // 512) * 512  # the allocator's 512-byte blocks
    assert offload_input_embedding(model) == "input embedding: in host memory"
    model.to("cuda")  # as transformers' Trainer does with a 16-bit model
    weight = model.get_input_embeddings().weight
    assert is_in_host_memory(weight) and weight.device.type == "cuda" and model.device.type == "cuda"
    torch.testing.assert_close(weight, reference.get_input_embeddings().weight, rtol=0, atol=0)
    assert model.state_dict().keys() == reference.state_dict().keys()
    expected_logits, expected = _step(reference, "cuda")
    logits, grads = _step(model, "cuda")
    torch.testing.assert_close(logits, expected_logits)
    assert grads.keys() == expected.keys()
    for name in grads:
        torch.testing.assert_close(grads[name], expected[name], msg=name)
