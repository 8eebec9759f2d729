"""Mixture-of-experts blocks (Qwen3-MoE, Mixtral) on the ``lora_moe`` op, and the router's load-balancing loss.

transformers 5 keeps a sparse block's experts as two fused 3-D parameters, ``experts.gate_up_proj``
``(E, 2I, H)`` and ``experts.down_proj`` ``(E, H, I)``, and its router as ``gate`` (a module whose
``weight`` is ``(E, H)``). peft adapts them through ``target_parameters``: each targeted parameter
gets a ``ParamWrapper`` around the experts module, with per-expert factors stored as
``lora_A.weight`` ``(E*r, in)`` and ``lora_B.weight`` ``(out, r*E)``. peft's own forward folds
``W + BA`` into every expert's weight on every call; the patched block instead reads the factors
(:func:`route_experts`) and hands them to ``lora_moe``, which sorts the token/expert pairs by
expert and runs grouped GEMMs with the LoRA kept low-rank.

With a 4-bit base (``load_in_4bit``) bitsandbytes leaves those 3-D parameters in 16 bits;
:func:`experts_quantized_on_arrival` stores each NF4 (``quantize_nf4``) the moment the loader assigns it,
so the 16-bit experts are never whole on the GPU (a 30B-A3B's are 57 GB), :func:`quantize_experts` does
the same for a model already loaded, and ``lora_moe`` unpacks them a layer (or a group of experts) at a time
for its grouped GEMMs.

The router is called as the module it is (peft's path when it is adapted: a ``(E, H)`` matrix is
cheap), so transformers' output recorder still collects ``router_logits`` for the auxiliary loss.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from ftengine.core.kernels import NF4_EXPERTS_ATTR
from ftengine.core.kernels import LoRAWeights

GetOp = Callable[[str], Callable[..., Any]]

EXPERT_WEIGHTS = ("gate_up_proj", "down_proj")

_WARNED: set[str] = set()


def _factors(wrapper: nn.Module, n_experts: int) -> tuple[LoRAWeights | None, str]:
    """The active adapter of one peft ``ParamWrapper`` as per-expert ``(E, r, in)`` / ``(E, out, r)`` factors."""
    if wrapper.merged:
        return None, "merged adapter"
    if wrapper.disable_adapters:
        return LoRAWeights(weight=torch.empty(0)), "disabled"
    active = [name for name in wrapper.active_adapters if name in wrapper.lora_A]
    if not active:
        return LoRAWeights(weight=torch.empty(0)), "disabled"
    if len(active) > 1:
        return None, "several active adapters"
    if not getattr(wrapper, "_did_swap_in_out_features", False):
        return None, "experts stored (E, in, out)"
    name = active[0]
    a = wrapper.lora_A[name].weight  # (E*r, in)
    b = wrapper.lora_B[name].weight  # (out, r*E), column j*E + e is rank j of expert e
    return LoRAWeights(
        weight=torch.empty(0),
        lora_a=a.reshape(n_experts, -1, a.shape[-1]),
        lora_b=b.reshape(b.shape[0], -1, n_experts).permute(2, 0, 1),
        scaling=float(wrapper.scaling[name]),
    ), "lora"


def base_experts(experts: nn.Module) -> nn.Module:
    """transformers' experts module under any peft ``ParamWrapper`` s around it."""
    while type(experts).__name__ == "ParamWrapper":
        experts = experts.base_layer
    return experts


def route_experts(experts: nn.Module) -> tuple[tuple[LoRAWeights, LoRAWeights] | None, str]:
    """``((gate_up, down), kind)`` for ``lora_moe``, or ``(None, reason)`` to call the experts module instead.

    Args:
        experts: a block's ``experts`` as it is now: transformers' fused experts module, or peft
            ``ParamWrapper`` s nested around it (one per adapted parameter).
    """
    adapters: dict[str, LoRAWeights] = {}
    module = experts
    reasons = []
    while type(module).__name__ == "ParamWrapper":
        factors, kind = _factors(module, module.num_experts)
        if factors is None:
            reasons.append(kind)
        elif factors.lora_a is not None:
            adapters[module.parameter_name] = factors
        module = module.base_layer
    if reasons:
        return None, reasons[0]
    if not hasattr(module, "gate_up_proj") or not hasattr(module, "down_proj"):
        return None, f"{type(module).__name__} without fused gate_up_proj/down_proj"
    if getattr(module, "is_transposed", False) or not getattr(module, "has_gate", True):
        return None, "transposed or gateless experts"
    if getattr(module, "has_bias", False):
        return None, "experts with biases"
    layers = []
    nf4 = module.__dict__.get(NF4_EXPERTS_ATTR, {})
    for name in ("gate_up_proj", "down_proj"):
        weight, state = nf4.get(name, (getattr(module, name), None))
        lora = adapters.get(name) or LoRAWeights(weight=weight)
        layers.append(LoRAWeights(weight=weight, lora_a=lora.lora_a, lora_b=lora.lora_b, scaling=lora.scaling,
                                  quant_state=state))
    return (layers[0], layers[1]), "lora" if adapters else "linear"


def _note_fallback(reason: str) -> None:
    if reason not in _WARNED:
        _WARNED.add(reason)
        warnings.warn(f"ftengine: MoE experts run unfused ({reason}); transformers' own path computes them",
                      stacklevel=3)


def block_forward(get_op: GetOp, activation: str) -> Callable[..., torch.Tensor]:
    """The forward of a sparse MoE block (``gate`` router + fused ``experts``) on ``lora_moe``."""

    def forward(self: nn.Module, hidden_states: torch.Tensor) -> torch.Tensor:
        shape = hidden_states.shape  # (B, T, H)
        x = hidden_states.reshape(-1, shape[-1])  # (N, H)
        jitter = float(getattr(self, "jitter_noise", 0.0) or 0.0)
        if self.training and jitter > 0:  # Mixtral's multiplicative router noise, as transformers applies it
            x = x * torch.empty_like(x).uniform_(1.0 - jitter, 1.0 + jitter)
        _, top_k_weights, top_k_index = self.gate(x)  # (N, K) each
        weights, reason = route_experts(self.experts)
        if weights is None:
            if NF4_EXPERTS_ATTR in base_experts(self.experts).__dict__:
                raise RuntimeError(f"4-bit experts run only on the lora_moe op, which cannot take these ({reason})")
            _note_fallback(reason)
            return self.experts(x, top_k_index, top_k_weights).reshape(shape)
        gate_up, down = weights
        return get_op("lora_moe")(x, top_k_index, top_k_weights, gate_up, down, activation=activation).reshape(shape)

    return forward


def _stand_in(param: torch.Tensor) -> nn.Parameter:
    """A zero-stride parameter of ``param``'s shape, dtype and device: peft sizes its adapters from it and it
    stores nothing; flagged initialised so that transformers' weight init leaves it alone."""
    stand_in = nn.Parameter(torch.zeros((), dtype=param.dtype, device=param.device).expand(param.shape),
                            requires_grad=False)
    stand_in._is_hf_initialized = True
    return stand_in


def _pack(experts: nn.Module, name: str, param: torch.Tensor, quantize: Callable[..., Any]) -> nn.Parameter:
    """Store ``param`` NF4 as ``experts.__dict__[NF4_EXPERTS_ATTR][name]``; returns the stand-in to hold in its
    place."""
    experts.__dict__.setdefault(NF4_EXPERTS_ATTR, {})[name] = quantize(param.detach())
    return _stand_in(param)


def quantize_experts(model: nn.Module, get_op: GetOp, block_classes: tuple[str, ...]) -> int:
    """Store the fused expert weights of every sparse block NF4; returns how many experts modules hold NF4.

    Each ``gate_up_proj`` / ``down_proj`` is packed one expert a row (``quantize_nf4``, double-quantized
    absmax) into ``experts.__dict__[NF4_EXPERTS_ATTR]`` and the parameter becomes a zero-stride
    stand-in of its shape and dtype, so the 16-bit weight is freed and peft still sizes its adapters
    from it. Call it before or after peft wraps the experts; experts stored NF4 while loading
    (:func:`experts_quantized_on_arrival`) are counted and left as they are.

    Args:
        block_classes: class names of the family's sparse blocks (a ``gate`` router and fused ``experts``).
    """
    quantize = get_op("quantize_nf4")
    count = 0
    for module in model.modules():
        if type(module).__name__ not in block_classes:
            continue
        experts = base_experts(module.experts)
        if NF4_EXPERTS_ATTR in experts.__dict__:
            count += 1
            continue
        if not hasattr(experts, "gate_up_proj"):
            continue
        for name in EXPERT_WEIGHTS:
            setattr(experts, name, _pack(experts, name, getattr(experts, name), quantize))
        count += 1
    return count


@contextmanager
def experts_quantized_on_arrival(get_op: GetOp) -> Iterator[None]:
    """While the body runs, every fused 3-D expert weight (``gate_up_proj`` / ``down_proj``) registered on a
    module off the meta device is stored NF4 at once and replaced by its stand-in, as :func:`quantize_experts`
    stores it.

    Wrap a ``load_in_4bit`` ``from_pretrained`` in it: transformers builds the model on the meta device and
    then assigns each layer's merged experts in turn, so at most one layer's 16-bit experts exist at a time
    instead of the whole model's. It works through PyTorch's global parameter-registration hook, which every
    ``module.name = Parameter(...)`` assignment runs.
    """
    quantize = get_op("quantize_nf4")

    def on_register(module: nn.Module, name: str, param: torch.Tensor | None) -> nn.Parameter | None:
        if name not in EXPERT_WEIGHTS or param is None or param.dim() != 3 or param.device.type == "meta":
            return None
        return _pack(module, name, param, quantize)

    handle = nn.modules.module.register_module_parameter_registration_hook(on_register)
    try:
        yield
    finally:
        handle.remove()


def num_experts(config: Any) -> int:
    """Routed experts per block, whichever name the family's config uses."""
    value = getattr(config, "num_experts", None) or getattr(config, "num_local_experts", None)
    return int(value)


def load_balancing_loss(router_logits: tuple[torch.Tensor, ...], n_experts: int, top_k: int,
                        attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Switch-Transformer auxiliary loss over all layers, as Hugging Face's MoE models define it.

    With ``p`` the router softmax of every (non-padding) token of every layer, ``f_e`` the number of
    top-k slots that went to expert ``e`` divided by the token count and ``P_e`` the mean of
    ``p[:, e]``: ``loss = E * sum_e f_e * P_e``. Only ``P`` carries gradient (to the routers).

    Args:
        router_logits: one ``(B*T, E)`` tensor per MoE layer.
        attention_mask: ``(B, T)``; padding tokens (0) are left out of both averages.
    """
    device = router_logits[0].device
    logits = torch.cat([layer.to(device) for layer in router_logits])  # (L*B*T, E)
    probs = torch.softmax(logits.float(), dim=-1)
    chosen = torch.topk(probs, top_k, dim=-1).indices  # (L*B*T, K)
    if attention_mask is None:
        keep = torch.ones(probs.shape[0], device=device)
    else:
        keep = attention_mask.reshape(-1).to(device, torch.float32).repeat(len(router_logits))
    counts = torch.zeros(n_experts, device=device).scatter_add_(0, chosen.reshape(-1), keep.repeat_interleave(top_k))
    tokens = keep.sum()
    return n_experts * torch.sum((counts / tokens) * ((probs * keep.unsqueeze(-1)).sum(0) / tokens))


def expert_metadata(config: Any) -> dict[str, Any]:
    """llama.cpp's expert keys: routed experts per block and experts used per token."""
    return {"expert_count": num_experts(config), "expert_used_count": int(config.num_experts_per_tok)}


def aux_loss(model: nn.Module, outputs: Any, attention_mask: torch.Tensor | None) -> torch.Tensor | None:
    """The router load-balancing loss of a forward whose outputs carry ``router_logits``, else ``None``."""
    router_logits = getattr(outputs, "router_logits", None)
    if not router_logits:
        return None
    config = model.config
    return load_balancing_loss(tuple(router_logits), num_experts(config), int(config.num_experts_per_tok),
                               attention_mask)
