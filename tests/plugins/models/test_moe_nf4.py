"""4-bit experts (QLoRA on a mixture of experts): with ``load_in_4bit`` the patch stores the fused
expert weights NF4 and ``lora_moe`` unpacks them a group of experts at a time. The reference is the
unpatched Hugging Face model (transformers' expert loop, peft's expert LoRA) holding the same
dequantized weights in fp32: loss, every LoRA gradient and the eval logits. A merged export of the
4-bit-expert model, reloaded by transformers, gives the in-memory model's logits."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import AutoModelForCausalLM
from transformers import AutoTokenizer
from transformers import Qwen3MoeConfig
from transformers import Qwen3MoeForCausalLM

import ftengine
from ftengine.core.kernels import NF4_EXPERTS_ATTR
from ftengine.core.kernels import get_op
from ftengine.demo import ASSETS

from .helpers import DEVICE
from .helpers import LORA_ALPHA
from .helpers import LORA_R
from .helpers import adapter
from .helpers import assert_equivalent
from .helpers import copy_dequantized
from .helpers import rel_err
from .moe_helpers import assert_experts_fused
from .moe_helpers import tiny_qwen3_moe_checkpoint

VOCAB = 640  # the demo tokenizer's, for the export


def config() -> Qwen3MoeConfig:
    cfg = Qwen3MoeConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, moe_intermediate_size=32,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_experts=4,
                         num_experts_per_tok=2, norm_topk_prob=True, max_position_embeddings=64,
                         tie_word_embeddings=False, initializer_range=0.1)
    cfg._attn_implementation = "sdpa"
    cfg._experts_implementation = "eager"
    return cfg


def four_bit_experts(model) -> list[str]:
    """Patch ``model`` as a 4-bit-loaded one (bitsandbytes' flag; its 2-D projections stay as they are)."""
    model.is_loaded_in_4bit = True
    return adapter("qwen3_moe").patch(model, get_op)


def nf4_pair():
    """``(unpatched fp32 model on the dequantized experts, patched model with NF4 experts)``, one LoRA on both."""
    from peft import LoraConfig
    from peft import get_peft_model

    torch.manual_seed(0)
    reference = Qwen3MoeForCausalLM(config()).to(DEVICE, torch.float32)
    original = {n: p.detach().clone() for n, p in reference.named_parameters() if "experts" in n}
    patched = copy.deepcopy(reference)
    lines = four_bit_experts(patched)
    assert any("stored NF4" in line for line in lines), lines
    assert copy_dequantized(patched, reference) == 4
    for name, weight in original.items():  # the experts really went through 4 bits
        assert 0.02 < rel_err(dict(reference.named_parameters())[name], weight) < 0.15, name
    targets = [*adapter("qwen3_moe").default_target_modules, "gate"]
    lora = LoraConfig(r=LORA_R, lora_alpha=LORA_ALPHA, lora_dropout=0.0, init_lora_weights=False,
                      target_modules=targets)
    reference = get_peft_model(reference, lora)
    patched = get_peft_model(patched, copy.deepcopy(lora))
    adapters = {k: v for k, v in reference.state_dict().items() if "lora_" in k}
    assert not patched.load_state_dict(adapters, strict=False).unexpected_keys
    return reference, patched


def test_nf4_experts_match_hf_on_the_dequantized_weights():
    """On the reference ops (the Triton ones are compared with them in the kernel tests)."""
    reference, patched = nf4_pair()
    experts = [m for m in patched.modules() if NF4_EXPERTS_ATTR in m.__dict__]
    assert len(experts) == 2
    for module in experts:
        assert module.gate_up_proj.stride() == (0, 0, 0), "the 16-bit weight must be freed"
        assert all(packed.dtype == torch.uint8 for packed, _ in module.__dict__[NF4_EXPERTS_ATTR].values())
    assert_experts_fused("qwen3_moe", patched, n_blocks=2)
    assert_equivalent(reference, patched, VOCAB, tol=1e-5)


def test_nf4_experts_refuse_the_unfused_path():
    _, patched = nf4_pair()
    for module in patched.modules():  # as after merging (peft cannot add a delta to a packed weight)
        if type(module).__name__ == "ParamWrapper":
            module.merged_adapters = ["default"]
    with pytest.raises(RuntimeError, match="4-bit experts run only on the lora_moe op"):
        patched(input_ids=torch.tensor([[1, 2, 3]], device=DEVICE))


def test_merged_export_of_nf4_experts_dequantizes(tmp_path):
    torch.manual_seed(0)
    base = Qwen3MoeForCausalLM(config())
    four_bit_experts(base)
    model = ftengine.add_lora(base, r=4, lora_alpha=8, target_modules=list(adapter("qwen3_moe").default_target_modules),
                              use_gradient_checkpointing=False)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.1)
    model.eval()
    tokens = torch.tensor([[1, 5, 17, 200, 33, 77, 101, 12, 9, 250]])
    with torch.no_grad():
        expected = model(input_ids=tokens).logits[0].float()
    tokenizer = AutoTokenizer.from_pretrained(str(ASSETS / "tokenizer"))
    out = ftengine.export(model, tokenizer, str(tmp_path / "merged"), format="merged", dtype="float16")
    reloaded = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
    assert reloaded.model.layers[0].mlp.experts.gate_up_proj.stride()[-1] == 1  # real weights, not the stand-in
    with torch.no_grad():
        got = reloaded(input_ids=tokens).logits[0]
    assert rel_err(got, expected) < 2e-3


def test_lora_dropout_on_experts_through_the_api_is_a_config_error():
    from ftengine.core.errors import ConfigError

    model = Qwen3MoeForCausalLM(config())
    with pytest.raises(ConfigError, match="lora.lora_dropout: 0.05 cannot apply to this qwen3_moe model's fused"):
        ftengine.add_lora(model, r=4, lora_dropout=0.05, use_gradient_checkpointing=False)


@pytest.mark.gpu
def test_nf4_experts_bf16_on_gpu_as_close_to_fp32_as_hf(monkeypatch):
    """bf16 on the GPU, the Triton ops (NF4 unpacking and grouped GEMMs included): as close to the fp32 truth on
    the same dequantized experts as transformers + peft in bf16."""
    from .helpers import GPU_SIZES
    from .helpers import assert_bf16_as_close_as_hf
    from .helpers import use_backend

    use_backend(monkeypatch, "triton")
    cfg = Qwen3MoeConfig(**{**GPU_SIZES, "moe_intermediate_size": 128, "num_experts": 8, "num_experts_per_tok": 2,
                            "num_hidden_layers": 2, "norm_topk_prob": True, "tie_word_embeddings": False})
    cfg._experts_implementation = "eager"
    assert_bf16_as_close_as_hf(Qwen3MoeForCausalLM, cfg, "qwen3_moe", four_bit_experts=True)


def test_qlora_run_stores_the_experts_nf4(make_tiny_run_config, tmp_path):
    """``ftengine run``'s pipeline with ``quantization.load_in_4bit`` on a Qwen3-MoE checkpoint: bitsandbytes
    quantizes the attention, ftengine packs the experts, and the experts' LoRA trains through them."""
    from ftengine.engine import pipeline

    model_dir = tiny_qwen3_moe_checkpoint(tmp_path / "qwen3-moe")
    run_config = make_tiny_run_config(model_dir, ASSETS / "data.jsonl", tmp_path, max_steps=2)
    run_config.quantization.load_in_4bit = True
    run_config.quantization.bnb_4bit_compute_dtype = "float32"
    result = pipeline.run(run_config)
    assert any("moe experts x2 stored NF4" in note for note in result.notes), result.notes
    assert result.train.steps == 2 and result.train.last_loss is not None
    experts = [m for m in result.model.modules() if NF4_EXPERTS_ATTR in m.__dict__]
    assert len(experts) == 2
    lora = [p for n, p in result.model.named_parameters() if ".experts." in n and "lora_B" in n]
    assert lora and all(p.abs().sum() > 0 for p in lora), "the experts' LoRA did not train"


def test_experts_are_stored_nf4_as_they_load_one_layer_at_a_time(tmp_path):
    """``quantized_load`` around ``from_pretrained``: each layer's fused experts are packed as they arrive and
    freed before the next layer's come, and the result is what packing the loaded model afterwards gives."""
    import weakref

    model_dir = tiny_qwen3_moe_checkpoint(tmp_path / "qwen3-moe")
    arrived: list[weakref.ref] = []
    most_alive = 0

    def watch(module, name, param):
        nonlocal most_alive
        if name in ("gate_up_proj", "down_proj") and param is not None and param.device.type != "meta":
            arrived.append(weakref.ref(param))
            most_alive = max(most_alive, sum(ref() is not None for ref in arrived))

    handle = torch.nn.modules.module.register_module_parameter_registration_hook(watch)  # runs before the packing
    try:
        with adapter("qwen3_moe").quantized_load(get_op):
            loaded = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    finally:
        handle.remove()
    assert len(arrived) == 4 and most_alive <= 2, (len(arrived), most_alive)

    plain = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    from ftengine.plugins.models import _moe

    assert _moe.quantize_experts(plain, get_op, ("Qwen3MoeSparseMoeBlock",)) == 2
    for (name, module), other in zip(loaded.named_modules(), plain.modules(), strict=True):
        if NF4_EXPERTS_ATTR not in other.__dict__:
            assert NF4_EXPERTS_ATTR not in module.__dict__, name
            continue
        for weight in ("gate_up_proj", "down_proj"):
            assert getattr(module, weight).stride() == (0, 0, 0), f"{name}.{weight} still holds its 16-bit values"
            ours, theirs = module.__dict__[NF4_EXPERTS_ATTR][weight], other.__dict__[NF4_EXPERTS_ATTR][weight]
            assert torch.equal(ours[0], theirs[0]) and torch.equal(ours[1].absmax, theirs[1].absmax), name
    inputs = torch.randint(0, VOCAB, (2, 12))
    four_bit_experts(loaded)
    four_bit_experts(plain)
    with torch.no_grad():
        torch.testing.assert_close(loaded(inputs).logits, plain(inputs).logits, rtol=0, atol=0)


def test_a_4_bit_load_through_the_pipeline_packs_the_experts_before_the_patch(make_tiny_run_config, tmp_path):
    from ftengine.engine import pipeline

    model_dir = tiny_qwen3_moe_checkpoint(tmp_path / "qwen3-moe")
    run_config = make_tiny_run_config(model_dir, ASSETS / "data.jsonl", tmp_path, max_steps=1)
    run_config.quantization.load_in_4bit = True
    run_config.quantization.bnb_4bit_compute_dtype = "float32"
    loaded = pipeline.load(run_config)
    experts = [m for m in loaded.model.modules() if NF4_EXPERTS_ATTR in m.__dict__]
    assert len(experts) == 2 and all(m.gate_up_proj.stride() == (0, 0, 0) for m in experts)
    lines = loaded.adapter.patch(loaded.model, get_op)
    assert any("moe experts x2 stored NF4" in line for line in lines), lines
