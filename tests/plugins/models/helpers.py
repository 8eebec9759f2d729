"""Shared pieces of the architecture-adapter tests: tiny model pairs and the equivalence checks.

Each family's test builds a tiny random model from its ``transformers`` config class, patches a
copy with the family's adapter, attaches the same LoRA (r=4, non-zero B) to both and compares the
patched model with the unpatched Hugging Face one: logits without labels, the loss with labels
(-100 masked, padded rows included), every LoRA gradient, and the ``num_items_in_batch`` loss.
"""

from __future__ import annotations

import collections
import copy
from collections.abc import Callable
from typing import Any

import pytest
import torch

from ftengine.core import kernels
from ftengine.core.kernels import get_op
from ftengine.core.plugins import get_registry
from ftengine.plugins.models._patching import USED_OPS

BACKENDS = ("reference", "triton")
GPU_SIZES = dict(hidden_size=256, intermediate_size=512, num_attention_heads=4, num_key_value_heads=2, head_dim=64,
                 vocab_size=1024, max_position_embeddings=512)
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
BATCH, SEQ = 2, 12
LORA_R, LORA_ALPHA = 4, 8


def counting_resolve_op(calls: collections.Counter) -> Callable[..., Any]:
    """``kernels.resolve_op`` whose ops count their calls by name in ``calls`` (ops are resolved when a model is
    patched, so install it before)."""
    resolve = kernels.resolve_op

    def counting(name, backends):
        backend, fn = resolve(name, backends)

        def call(*args, **kwargs):
            calls[name] += 1
            return fn(*args, **kwargs)

        return backend, call

    return counting


def adapter(name: str) -> Any:
    return get_registry("models")[name]


def use_backend(monkeypatch: pytest.MonkeyPatch, backend: str) -> None:
    """Pin the ops to ``backend`` (ops it lacks fall back to the reference); skip when it has none of ours."""
    if backend != "reference":
        registered = get_registry("kernels").get(backend)
        if registered is None or not registered.available():
            pytest.skip(f"kernel backend {backend!r} is not available here")
        if not any(getattr(registered, op, None) is not None for op in USED_OPS):
            pytest.skip(f"kernel backend {backend!r} registers none of the ops the model patches use yet")
    monkeypatch.setenv("FTENGINE_KERNELS", backend)


def tiny_pair(model_cls: type, config: Any, family: str, seed: int = 0,
              **lora_kwargs: Any) -> tuple[Any, Any, list[str]]:
    """``(unpatched, patched, patch_lines)``: one random model, twice, each with the same LoRA."""
    from peft import LoraConfig
    from peft import get_peft_model

    torch.manual_seed(seed)
    reference = model_cls(config).to(DEVICE, torch.float32)
    patched = copy.deepcopy(reference)
    lines = adapter(family).patch(patched, get_op)
    lora_kwargs.setdefault("target_modules", list(adapter(family).default_target_modules))
    lora = LoraConfig(r=LORA_R, lora_alpha=LORA_ALPHA, lora_dropout=0.0, init_lora_weights=False, **lora_kwargs)
    reference = get_peft_model(reference, lora)
    patched = get_peft_model(patched, copy.deepcopy(lora))
    patched.load_state_dict(reference.state_dict())
    return reference, patched, lines


def batch(vocab: int, seed: int = 1) -> dict[str, torch.Tensor]:
    """Token ids, an attention mask with a right-padded second row, and labels masked on the prompt and pads."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (BATCH, SEQ), generator=g)
    mask = torch.ones(BATCH, SEQ, dtype=torch.long)
    mask[1, -4:] = 0
    labels = ids.clone()
    labels[:, :3] = -100
    labels[mask == 0] = -100
    return {"input_ids": ids.to(DEVICE), "attention_mask": mask.to(DEVICE), "labels": labels.to(DEVICE)}


def lora_grads(model: Any) -> dict[str, torch.Tensor]:
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert grads and all(g is not None for g in grads.values()), "a LoRA weight got no gradient"
    return grads


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp(min=1e-30)).item()


def assert_equivalent(reference: Any, patched: Any, vocab: int, tol: float = 1e-5, eval_tol: float | None = None,
                      **forward_kwargs: Any) -> None:
    """Loss, every LoRA gradient and the eval logits of ``patched`` match ``reference`` within ``tol`` (relative;
    ``eval_tol`` for the logits when it differs)."""
    inputs = {**batch(vocab), **forward_kwargs}
    reference.train()
    patched.train()
    out_ref, out_pat = reference(**inputs), patched(**inputs)
    assert out_pat.logits is None, "training with labels must not build the logits"
    assert abs(out_pat.loss.item() - out_ref.loss.item()) <= tol * abs(out_ref.loss.item()), (
        f"loss {out_pat.loss.item()} != {out_ref.loss.item()}")
    out_ref.loss.backward()
    out_pat.loss.backward()
    g_ref, g_pat = lora_grads(reference), lora_grads(patched)
    assert g_ref.keys() == g_pat.keys()
    for name in g_ref:
        err = rel_err(g_pat[name], g_ref[name])
        assert err <= 10 * tol, f"gradient of {name}: relative error {err:.2e}"
    reference.eval()
    patched.eval()
    no_labels = {k: v for k, v in inputs.items() if k != "labels"}
    # autograd on: without it a forward this small is a decode step, which runs the modules' own forwards
    logits_ref, logits_pat = reference(**no_labels).logits.detach(), patched(**no_labels).logits.detach()
    err = rel_err(logits_pat, logits_ref)
    assert err <= (eval_tol or tol), f"eval logits: relative error {err:.2e}"


def assert_fully_fused(family: str, patched: Any, kind: str = "lora") -> None:
    """Every projection runs through a fused op of ``kind`` (none fell back to peft's path)."""
    routes = adapter(family).routes(patched)
    experts = [line for line in routes if line.startswith("experts ")]  # mixture-of-experts blocks
    assert all(line.startswith("experts fused") for line in experts), routes
    dense = [line for line in routes if line not in experts]
    assert len(dense) == 1 and dense[0].startswith(f"fused {kind} x"), routes


def assert_num_items_in_batch(reference: Any, patched: Any, vocab: int, tol: float = 1e-5) -> None:
    """With ``num_items_in_batch`` both losses are the token sum over that count (gradient accumulation)."""
    inputs = batch(vocab, seed=2)
    reference.train()
    patched.train()
    n = torch.tensor(37)
    loss_ref = reference(**inputs, num_items_in_batch=n).loss
    loss_pat = patched(**inputs, num_items_in_batch=n).loss
    assert abs(loss_pat.item() - loss_ref.item()) <= tol * abs(loss_ref.item())
    plain = reference(**inputs).loss
    assert abs(loss_ref.item() - plain.item()) > 1e-3, "the count must change the loss for this check to mean anything"


def assert_packed_equivalent(reference: Any, patched: Any, vocab: int, tol: float = 1e-5) -> None:
    """Two sequences packed in one row (position ids restart, no attention mask): same loss and logits."""
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, vocab, (1, 2 * SEQ), generator=g).to(DEVICE)
    positions = torch.cat([torch.arange(SEQ), torch.arange(SEQ)]).unsqueeze(0).to(DEVICE)
    labels = ids.clone()
    labels[0, SEQ] = -100  # the first token of the second document predicts nothing across the boundary
    reference.train()
    patched.train()
    loss_ref = reference(input_ids=ids, position_ids=positions, labels=labels).loss
    loss_pat = patched(input_ids=ids, position_ids=positions, labels=labels).loss
    assert abs(loss_pat.item() - loss_ref.item()) <= tol * abs(loss_ref.item())
    reference.eval()
    patched.eval()
    err = rel_err(patched(input_ids=ids, position_ids=positions).logits.detach(),  # autograd on: the fused ops run
                  reference(input_ids=ids, position_ids=positions).logits.detach())
    assert err <= tol, f"packed eval logits: relative error {err:.2e}"


def assert_bf16_as_close_as_hf(model_cls: type, config: Any, family: str, seq: int = 256,
                               inputs: dict[str, torch.Tensor] | None = None, target_modules: Any = None,
                               init: Any = None, four_bit_experts: bool = False) -> None:
    """On the GPU at bf16: the patched model's loss, LoRA gradients and eval logits are as close to the fp32
    truth (the unpatched model in fp32) as the unpatched bf16 model is (within 2x plus a floor).

    ``inputs`` (with ``labels``) replace the random token batch, e.g. a vision-language batch with pixels;
    ``init(model)`` changes the random fp32 model before it is copied (Mllama's closed cross-attention gates);
    ``four_bit_experts``: the patched model stores its experts NF4 (as under ``load_in_4bit``), the other two
    hold the same weights dequantized."""
    from peft import LoraConfig
    from peft import get_peft_model

    torch.manual_seed(0)
    base = model_cls(config).to(DEVICE, torch.float32)
    if init is not None:
        init(base)
    models = {"truth": base, "hf": copy.deepcopy(base).to(torch.bfloat16)}
    models["ours"] = copy.deepcopy(models["hf"])
    if four_bit_experts:
        models["ours"].is_loaded_in_4bit = True
    adapter(family).patch(models["ours"], get_op)
    if four_bit_experts:
        assert copy_dequantized(models["ours"], models["truth"]) and copy_dequantized(models["ours"], models["hf"])
    lora = LoraConfig(r=16, lora_alpha=16, init_lora_weights=False,
                      target_modules=target_modules or list(adapter(family).default_target_modules))
    models = {k: get_peft_model(m, copy.deepcopy(lora)) for k, m in models.items()}
    adapters = {k: v for k, v in models["truth"].state_dict().items() if "lora_" in k}
    for key in ("hf", "ours"):
        assert not models[key].load_state_dict(adapters, strict=False).unexpected_keys
    assert_fully_fused(family, models["ours"])
    if inputs is None:
        g = torch.Generator().manual_seed(1)
        ids = torch.randint(0, config.vocab_size, (2, seq), generator=g).to(DEVICE)
        labels = ids.clone()
        labels[:, : seq // 4] = -100
        inputs = {"input_ids": ids, "labels": labels}
    results = {}
    for key, model in models.items():
        dtype = next(model.parameters()).dtype
        typed = {k: v.to(dtype) if v.is_floating_point() else v for k, v in inputs.items()}
        model.train()
        loss = model(**typed).loss
        loss.backward()
        model.eval()
        with torch.no_grad():
            logits = model(**{k: v for k, v in typed.items() if k != "labels"}).logits.float()
        results[key] = (loss.detach().float(), lora_grads(model), logits)
    truth = results["truth"]
    for key_name, index in (("loss", 0), ("eval logits", 2)):
        e_hf, e_ours = rel_err(results["hf"][index], truth[index]), rel_err(results["ours"][index], truth[index])
        assert e_ours <= 2 * e_hf + 1e-3, f"{key_name}: ours {e_ours:.2e} vs Hugging Face bf16 {e_hf:.2e}"
    for name, g_truth in truth[1].items():
        e_hf = rel_err(results["hf"][1][name].float(), g_truth)
        e_ours = rel_err(results["ours"][1][name].float(), g_truth)
        assert e_ours <= 2 * e_hf + 1e-2, f"gradient of {name}: ours {e_ours:.2e} vs Hugging Face bf16 {e_hf:.2e}"


def copy_dequantized(source: Any, target: Any) -> int:
    """Put ``source``'s NF4-stored experts, dequantized, into ``target``'s expert parameters; returns how many."""
    from ftengine.core.kernels import NF4_EXPERTS_ATTR

    copied = 0
    modules = dict(target.named_modules())
    for name, module in source.named_modules():
        for pname, (packed, state) in module.__dict__.get(NF4_EXPERTS_ATTR, {}).items():
            getattr(modules[name], pname).data.copy_(get_op("dequantize_nf4")(packed, state))
            copied += 1
    return copied


def assert_qlora_matches_peft(model_cls: type, config: Any, family: str, vocab: int, tmp_path: Any,
                              init: Any = None, **forward_kwargs: Any) -> None:
    """A saved tiny model loaded twice in NF4 (double quantization, fp32 compute), one copy patched: the same
    LoRA gives the same loss and gradients through the fused NF4 ops as through peft's bitsandbytes layers.

    bitsandbytes' CPU dequantization is wrong for rows shorter than a 64-value block (0.50.2), so every
    projection of ``config`` needs at least 64 inputs. In eval mode without gradients bitsandbytes switches to
    a bf16 CPU kernel, so the eval logits are compared at bf16's precision."""
    from peft import LoraConfig
    from peft import get_peft_model
    from transformers import BitsAndBytesConfig

    torch.manual_seed(0)
    model = model_cls(config)
    if init is not None:
        init(model)
    model.save_pretrained(tmp_path)
    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32,
                               bnb_4bit_use_double_quant=True)
    models = [model_cls.from_pretrained(tmp_path, quantization_config=quant, dtype=torch.float32) for _ in range(2)]
    assert adapter(family).patch(models[1], get_op)
    lora = LoraConfig(r=4, lora_alpha=8, init_lora_weights=False, target_modules="all-linear")
    torch.manual_seed(1)
    reference = get_peft_model(models[0], lora)
    patched = get_peft_model(models[1], LoraConfig(**lora.to_dict()))
    patched.load_state_dict(reference.state_dict(), strict=False)
    assert_fully_fused(family, patched, kind="lora+nf4")
    assert_equivalent(reference, patched, vocab, tol=1e-5, eval_tol=1e-2, **forward_kwargs)
