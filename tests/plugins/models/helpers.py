"""Shared pieces of the architecture-adapter tests: tiny model pairs and the equivalence checks.

Each family's test builds a tiny random model from its ``transformers`` config class, patches a
copy with the family's adapter, attaches the same LoRA (r=4, non-zero B) to both and compares the
patched model with the unpatched Hugging Face one: logits without labels, the loss with labels
(-100 masked, padded rows included), every LoRA gradient, and the ``num_items_in_batch`` loss.
"""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch

from ftengine.core.kernels import get_op
from ftengine.core.plugins import get_registry
from ftengine.plugins.models._patching import USED_OPS

BACKENDS = ("reference", "triton")
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
BATCH, SEQ = 2, 12
LORA_R, LORA_ALPHA = 4, 8


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


def tiny_pair(model_cls: type, config: Any, family: str, dtype: torch.dtype = torch.float32,
              seed: int = 0, **lora_kwargs: Any) -> tuple[Any, Any, list[str]]:
    """``(unpatched, patched, patch_lines)``: one random model, twice, each with the same LoRA."""
    from peft import LoraConfig
    from peft import get_peft_model

    torch.manual_seed(seed)
    reference = model_cls(config).to(DEVICE, dtype)
    patched = copy.deepcopy(reference)
    lines = adapter(family).patch(patched, get_op)
    lora = LoraConfig(r=LORA_R, lora_alpha=LORA_ALPHA, lora_dropout=0.0, init_lora_weights=False,
                      target_modules=list(adapter(family).default_target_modules), **lora_kwargs)
    reference = get_peft_model(reference, lora)
    patched = get_peft_model(patched, copy.deepcopy(lora))
    patched.load_state_dict(reference.state_dict())
    return reference, patched, lines


def batch(vocab: int, seed: int = 1, padded: bool = True) -> dict[str, torch.Tensor]:
    """Token ids, an attention mask with a right-padded second row, and labels masked on the prompt and pads."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (BATCH, SEQ), generator=g)
    mask = torch.ones(BATCH, SEQ, dtype=torch.long)
    if padded:
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
    with torch.no_grad():
        logits_ref, logits_pat = reference(**no_labels).logits, patched(**no_labels).logits
    err = rel_err(logits_pat, logits_ref)
    assert err <= (eval_tol or tol), f"eval logits: relative error {err:.2e}"


def assert_fully_fused(family: str, patched: Any, kind: str = "lora") -> None:
    """Every projection runs through a fused op of ``kind`` (none fell back to peft's path)."""
    routes = adapter(family).routes(patched)
    assert len(routes) == 1 and routes[0].startswith(f"fused {kind} x"), routes


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
    with torch.no_grad():
        err = rel_err(patched(input_ids=ids, position_ids=positions).logits,
                      reference(input_ids=ids, position_ids=positions).logits)
    assert err <= tol, f"packed eval logits: relative error {err:.2e}"
