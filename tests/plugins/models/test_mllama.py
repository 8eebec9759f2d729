"""Llama 3.2 Vision adapter: with images in the batch, the patched model (self-attention layers, MLPs,
norms and cross-attention projections on the kernel ops; the ViT Hugging Face's) matches the unpatched one
in loss, every LoRA gradient (both towers, the cross-attention layers included) and eval logits."""

from __future__ import annotations

import pytest
from transformers import MllamaForCausalLM
from transformers import MllamaForConditionalGeneration

from .helpers import BACKENDS
from .helpers import GPU_SIZES
from .helpers import adapter
from .helpers import assert_bf16_as_close_as_hf
from .helpers import assert_equivalent
from .helpers import assert_fully_fused
from .helpers import assert_qlora_matches_peft
from .helpers import tiny_pair
from .helpers import use_backend
from .vision_helpers import VOCAB
from .vision_helpers import chosen_modules
from .vision_helpers import mllama_batch
from .vision_helpers import mllama_config


def randomize_gates(model) -> None:
    """Hugging Face initialises the cross-attention gates at 0 (tanh 0 = the layer adds nothing): open them."""
    for name, param in model.named_parameters():
        if name.endswith(("cross_attn_attn_gate", "cross_attn_mlp_gate")):
            param.data.fill_(0.7)


@pytest.mark.parametrize("backend", BACKENDS)
def test_patched_matches_hf_with_images(backend, monkeypatch):
    use_backend(monkeypatch, backend)
    targets = adapter("mllama").vision.target_modules()
    reference, patched, lines = tiny_pair(MllamaForConditionalGeneration, mllama_config(), "mllama",
                                          target_modules=targets)
    randomize_gates(reference)
    patched.load_state_dict(reference.state_dict())
    # 2 per text layer, q/k norms of the cross-attention layer and the final norm; none in the ViT
    assert lines[0].startswith("rms_norm x9 ->"), lines
    assert any(line.startswith("MllamaTextCrossAttention x1 ->") for line in lines), lines
    assert any(line.startswith("causal-LM loss") for line in lines), lines
    assert_fully_fused("mllama", patched)
    lora = {n for n, _ in patched.named_parameters() if "lora_" in n}
    assert any(".vision_model." in n for n in lora) and any(".cross_attn." in n for n in lora)
    assert not any("multi_modal_projector" in n for n in lora)
    assert_equivalent(reference, patched, VOCAB, tol=1e-5 if backend == "reference" else 1e-4, **mllama_batch())


def test_text_only_model_matches_hf():
    """MllamaForCausalLM (the language tower alone): without images the cross-attention layers are skipped, so
    LoRA goes on the self-attention layers."""
    targets = r".*layers\.[02]\.(self_attn|mlp)\.(q|k|v|o|gate|up|down)_proj"
    reference, patched, lines = tiny_pair(MllamaForCausalLM, mllama_config().text_config, "mllama",
                                          target_modules=targets)
    assert any(line.startswith("causal-LM loss") for line in lines), lines
    assert adapter("mllama").routes(patched) == ["fused linear x7", "fused lora x14"]  # the cross layer: no LoRA
    assert_equivalent(reference, patched, VOCAB)


def test_finetune_switches_select_modules():
    spec = adapter("mllama").vision
    model = MllamaForConditionalGeneration(mllama_config())

    def chosen(**switches):
        return chosen_modules(spec, model, **switches)

    language_only = chosen(vision_layers=False)
    assert len(language_only) == 3 * 7 and all(n.startswith("model.language_model.layers.") for n in language_only)
    vision_attention = chosen(language_layers=False, mlp=False)
    assert {n.rsplit(".", 1)[1] for n in vision_attention} == {"q_proj", "k_proj", "v_proj", "o_proj"}
    assert len(vision_attention) == 4 * 3  # 2 local + 1 global ViT layers
    assert len(chosen(language_layers=False, attention=False)) == 2 * 3  # fc1 / fc2
    assert not any("multi_modal_projector" in n for n in chosen())
    assert spec.unquantized()[:2] == ("model.vision_model", "model.multi_modal_projector")


def test_qlora_nf4_matches_peft_with_images(tmp_path):
    """Every projection NF4 (bitsandbytes needs >= 64 inputs on the CPU): the cross-attention's fused NF4 path
    equals peft's bitsandbytes layers."""
    pytest.importorskip("bitsandbytes")
    cfg = mllama_config(hidden_size=64, intermediate_size=128)
    cfg.vision_config.hidden_size, cfg.vision_config.intermediate_size = 64, 128
    cfg.vision_config.vision_output_dim = 128
    assert_qlora_matches_peft(MllamaForConditionalGeneration, cfg, "mllama", VOCAB, tmp_path, init=randomize_gates,
                              **mllama_batch())


@pytest.mark.gpu
def test_bf16_on_gpu_with_images_as_close_to_fp32_as_hf(monkeypatch):
    use_backend(monkeypatch, "triton")
    cfg = mllama_config(**{k: v for k, v in GPU_SIZES.items() if k != "head_dim"})
    assert_bf16_as_close_as_hf(MllamaForConditionalGeneration, cfg, "mllama", inputs=mllama_batch(),
                               target_modules=adapter("mllama").vision.target_modules(), init=randomize_gates)
