"""Qwen2-VL / Qwen2.5-VL adapters: with images in the batch, the patched model (language tower on the
kernel ops, mrope included; Qwen2.5-VL's vision norms and MLPs too, its window attention and all of
Qwen2-VL's tower Hugging Face's) matches the unpatched one in loss, every LoRA gradient (vision and
language towers) and eval logits."""

from __future__ import annotations

import pytest
from transformers import Qwen2_5_VLForConditionalGeneration
from transformers import Qwen2VLForConditionalGeneration

from .helpers import BACKENDS
from .helpers import adapter
from .helpers import assert_equivalent
from .helpers import assert_fully_fused
from .helpers import tiny_pair
from .helpers import use_backend
from .vision_helpers import VOCAB
from .vision_helpers import chosen_modules
from .vision_helpers import qwen_vl_batch
from .vision_helpers import qwen_vl_config

MODELS = {"qwen2_vl": (Qwen2VLForConditionalGeneration, "2"), "qwen2_5_vl": (Qwen2_5_VLForConditionalGeneration, "2.5")}


@pytest.mark.parametrize("family", sorted(MODELS))
@pytest.mark.parametrize("backend", BACKENDS)
def test_patched_matches_hf_with_images(family, backend, monkeypatch):
    use_backend(monkeypatch, backend)
    model_cls, version = MODELS[family]
    targets = adapter(family).vision.target_modules()
    reference, patched, lines = tiny_pair(model_cls, qwen_vl_config(version), family, target_modules=targets)
    assert lines[0].startswith("rms_norm x5 ->"), lines  # 2 per text layer and the final norm
    tower = [line for line in lines if line.startswith("vision tower: ")]
    if family == "qwen2_5_vl":  # 2 per block and the merger's; the gated MLP and the attention of each block
        assert [line.split(" -> ")[0] for line in tower] == ["vision tower: rms_norm x5", "vision tower: mlp x2",
                                                            "vision tower: Qwen2_5_VLVisionAttention x2"]
    else:
        assert [line.split(" -> ")[0] for line in tower] == ["vision tower: VisionAttention x2"], lines
    assert any(line.startswith("causal-LM loss") for line in lines), lines
    assert_fully_fused(family, patched)
    vision_lora = [n for n, _ in patched.named_parameters() if ".visual." in n and "lora_" in n]
    assert vision_lora and not any(".merger." in n for n in vision_lora)
    assert_equivalent(reference, patched, VOCAB, tol=1e-5 if backend == "reference" else 1e-4, **qwen_vl_batch())


def test_finetune_switches_select_modules():
    spec = adapter("qwen2_5_vl").vision
    model = Qwen2_5_VLForConditionalGeneration(qwen_vl_config())

    def chosen(**switches):
        return chosen_modules(spec, model, **switches)

    language_only = chosen(vision_layers=False)
    assert language_only and all(n.startswith("model.language_model.") for n in language_only)
    vision_mlp = chosen(language_layers=False, attention=False)
    assert {n.rsplit(".", 1)[1] for n in vision_mlp} == {"gate_proj", "up_proj", "down_proj"}
    assert all(n.startswith("model.visual.blocks.") for n in vision_mlp)
    assert len(chosen()) == 2 * 7 + 2 * 5  # 7 projections per text layer, qkv/proj + 3 MLP per vision block
    assert spec.target_modules(vision_layers=False, language_layers=False) is None


def test_gguf_names_and_mrope_sections():
    gguf = adapter("qwen2_5_vl").gguf
    cfg = qwen_vl_config()
    names = {n: gguf.tensor_name(n) for n in Qwen2_5_VLForConditionalGeneration(cfg).state_dict()}
    assert names["model.language_model.layers.1.self_attn.q_proj.bias"] == "blk.1.attn_q.bias"
    assert names["model.language_model.embed_tokens.weight"] == "token_embd.weight"
    assert names["lm_head.weight"] == "output.weight"
    assert all(v is None for k, v in names.items() if k.startswith("model.visual."))
    meta = gguf.metadata(cfg)
    assert meta["rope.dimension_sections"] == [1, 1, 2, 0]
    assert meta["rope.dimension_count"] == 8
