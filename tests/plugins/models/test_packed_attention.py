"""Packed rows under FlexAttention: transformers turns the restarting position ids into a block mask with one
causal block per sample, the patched attention runs it through ``flex_attention``, and the blocks that lie
across two samples are skipped. Each sample's logits (CPU, forward only: FlexAttention has no backward on the
CPU) and, on a GPU in bf16, each sample's loss and the LoRA gradients match the samples run alone with sdpa."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import LlamaForCausalLM
from transformers import Qwen2ForCausalLM

from ftengine.engine.data import pack_rows
from ftengine.plugins.trainers.collator import PadCollator

from .helpers import DEVICE
from .helpers import GPU_SIZES
from .helpers import LORA_ALPHA
from .helpers import LORA_R
from .helpers import adapter
from .helpers import lora_grads
from .helpers import rel_err
from .helpers import tiny_pair
from .test_llama import VOCAB as LLAMA_VOCAB
from .test_llama import config as llama_config
from .test_qwen2 import VOCAB as QWEN2_VOCAB
from .test_qwen2 import config as qwen2_config

# Packed into rows of 260 (best-fit decreasing): [200, 60] and [150, 97, 9] + 4 pads. With FlexAttention's
# 128-token blocks, the third query block of the first row (sample 2 alone) never reads the first key block
# (sample 1 alone): a block a causal mask computes and the document mask skips.
SAMPLE_LENGTHS = (200, 60, 150, 97, 9)
ROW_LENGTH = 260


def packed_samples(vocab: int, seed: int = 0) -> tuple[dict[str, torch.Tensor], list[tuple[int, int, int]]]:
    """Random samples packed by the data stage and batched by the collator (pads at position 0), and each
    sample's ``(row, start, end)`` in the batch."""
    g = torch.Generator().manual_seed(seed)
    samples = []
    for n in SAMPLE_LENGTHS:
        ids = torch.randint(0, vocab, (n,), generator=g).tolist()
        samples.append({"input_ids": ids, "labels": ids})
    rows = pack_rows(samples, ROW_LENGTH)
    spans = []
    for b, row in enumerate(rows):
        starts = [i for i, p in enumerate(row["position_ids"]) if p == 0] + [len(row["input_ids"])]
        spans += [(b, a, end) for a, end in zip(starts, starts[1:], strict=False)]
    assert sorted(end - a for _, a, end in spans) == sorted(SAMPLE_LENGTHS)
    batch = PadCollator(pad_token_id=0)(rows)
    assert "attention_mask" not in batch and (batch["input_ids"].shape[1] > min(len(r["input_ids"]) for r in rows))
    return {k: v.to(DEVICE) for k, v in batch.items()}, spans


@pytest.fixture
def flex_spy(monkeypatch):
    """Records the mask of every flex_attention call (and still runs transformers' flex_attention)."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    flex, masks = ALL_ATTENTION_FUNCTIONS["flex_attention"], []

    def spy(module, query, key, value, attention_mask, **kwargs):
        masks.append(attention_mask)
        return flex(module, query, key, value, attention_mask, **kwargs)

    monkeypatch.setitem(ALL_ATTENTION_FUNCTIONS._global_mapping, "flex_attention", spy)
    return masks


def assert_document_block_mask(masks: list, batch: dict[str, torch.Tensor]) -> None:
    """Every call got a BlockMask, and it computes fewer blocks than a plain causal mask of the same size."""
    from torch.nn.attention.flex_attention import BlockMask
    from torch.nn.attention.flex_attention import create_block_mask

    assert masks and all(isinstance(m, BlockMask) for m in masks), [type(m).__name__ for m in masks]
    rows, length = batch["input_ids"].shape
    causal = create_block_mask(lambda b, h, q, kv: q >= kv, rows, None, length, length, device=DEVICE)
    computed, causal_computed = int(masks[0].to_dense().sum()), int(causal.to_dense().sum())  # (row, block) pairs
    assert computed < causal_computed, (computed, causal_computed)


FAMILIES = {
    "llama": (LlamaForCausalLM, llama_config, LLAMA_VOCAB),
    "qwen2": (Qwen2ForCausalLM, qwen2_config, QWEN2_VOCAB),
}


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_packed_flex_logits_match_each_sample_alone_with_sdpa(family, flex_spy):
    model_cls, make_config, vocab = FAMILIES[family]
    config = make_config(head_dim=16)  # FlexAttention's CUDA kernel needs at least 16 (this test also runs there)
    reference, patched, _ = tiny_pair(model_cls, config, family)  # HF + sdpa; ours, same weights and LoRA
    patched.set_attn_implementation("flex_attention")
    assert patched.config._attn_implementation == "flex_attention"
    assert reference.config._attn_implementation == "sdpa"
    batch, spans = packed_samples(vocab)
    reference.eval()
    patched.eval()
    with torch.no_grad():
        packed = patched(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits
        for b, a, end in spans:
            alone = reference(input_ids=batch["input_ids"][b:b + 1, a:end], use_cache=False).logits[0]
            torch.testing.assert_close(packed[b, a:end], alone, atol=2e-5, rtol=1e-5)
    assert_document_block_mask(flex_spy, batch)


def per_sample_losses(model, batch: dict[str, torch.Tensor], spans: list[tuple[int, int, int]],
                      packed: bool) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Each sample's mean next-token loss (from the logits) and the LoRA gradients of the training loss:
    packed, the whole batch through the fused loss; unpacked, each sample alone, weighted by its trained tokens."""
    model.zero_grad(set_to_none=True)
    model.train()
    ids = batch["input_ids"]
    if packed:
        model(**batch, use_cache=False).loss.backward()
    else:
        trained = sum(end - a - 1 for _, a, end in spans)
        for b, a, end in spans:
            loss = model(input_ids=ids[b:b + 1, a:end], labels=ids[b:b + 1, a:end], use_cache=False).loss
            (loss * (end - a - 1) / trained).backward()
    losses = []
    with torch.no_grad():
        if packed:
            logits = model(input_ids=ids, position_ids=batch["position_ids"], use_cache=False).logits
        for b, a, end in spans:
            sample = logits[b, a:end] if packed else model(input_ids=ids[b:b + 1, a:end], use_cache=False).logits[0]
            losses.append(torch.nn.functional.cross_entropy(sample[:-1].float(), ids[b, a + 1:end]))
    return torch.stack(losses), {n: g.float() for n, g in lora_grads(model).items()}


@pytest.mark.gpu
def test_packed_flex_trains_like_each_sample_alone_with_sdpa_in_bf16(flex_spy):
    """The fp32 truth (Hugging Face, sdpa, each sample alone) against ours in bf16: packed with
    flex_attention, and each sample alone with sdpa. Packed flex must be as close to the truth as
    unpacked sdpa is (within 2x plus a floor), for every sample's loss and every LoRA gradient."""
    from peft import LoraConfig
    from peft import get_peft_model

    from ftengine.core.kernels import get_op

    cfg = llama_config(**GPU_SIZES)
    torch.manual_seed(0)
    base = LlamaForCausalLM(cfg).to(DEVICE, torch.float32)
    models = {"truth": base, "sdpa": copy.deepcopy(base).to(torch.bfloat16)}
    models["flex"] = copy.deepcopy(models["sdpa"])
    for key in ("sdpa", "flex"):
        adapter("llama").patch(models[key], get_op)
    lora = LoraConfig(r=LORA_R, lora_alpha=LORA_ALPHA, init_lora_weights=False,
                      target_modules=list(adapter("llama").default_target_modules))
    models = {k: get_peft_model(m, copy.deepcopy(lora)) for k, m in models.items()}
    for key in ("sdpa", "flex"):
        models[key].load_state_dict(models["truth"].state_dict())
    models["flex"].set_attn_implementation("flex_attention")
    assert [m.config._attn_implementation for m in models.values()] == ["sdpa", "sdpa", "flex_attention"]
    batch, spans = packed_samples(cfg.vocab_size)
    results = {key: per_sample_losses(model, batch, spans, packed=key == "flex") for key, model in models.items()}
    assert_document_block_mask(flex_spy, batch)
    truth = results["truth"]
    e_sdpa, e_flex = rel_err(results["sdpa"][0], truth[0]), rel_err(results["flex"][0], truth[0])
    assert e_flex <= 2 * e_sdpa + 1e-3, f"per-sample losses: packed flex {e_flex:.2e} vs unpacked sdpa {e_sdpa:.2e}"
    for name, g_truth in truth[1].items():
        e_sdpa, e_flex = rel_err(results["sdpa"][1][name], g_truth), rel_err(results["flex"][1][name], g_truth)
        assert e_flex <= 2 * e_sdpa + 1e-2, f"{name} gradient: packed flex {e_flex:.2e} vs unpacked sdpa {e_sdpa:.2e}"
