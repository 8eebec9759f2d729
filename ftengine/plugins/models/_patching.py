"""The one mechanism behind every architecture adapter: per-instance forwards built on the kernel ops.

An adapter names the Hugging Face classes of its norms, attention blocks, MLPs and causal-LM
heads; :func:`patch_model` gives each matching module instance a forward written here (the causal-LM
one in :mod:`._causal_lm`) from the math, calling the ops that ``get_op`` resolves. Nothing is copied
from the modeling files and no class is changed: ``module.forward`` is set on the instance (and
:func:`unpatch_model` removes it).

Patching runs before peft attaches LoRA, so the forwards look at the projection modules at call
time (:func:`route`): a plain frozen ``nn.Linear``, a bitsandbytes ``Linear4bit`` or a peft LoRA
layer with one active plain adapter becomes a :class:`LoRAWeights` for the fused ops; anything
else (DoRA, dropout, merged or mixed adapters, 8-bit bases, trainable base weights) is called as
the module it is, so peft's own path runs. :func:`routing_report` says which way each one goes.
"""

from __future__ import annotations

import functools
import sys
import types
import warnings
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ftengine.core.kernels import FUSED_LOSS_ATTR
from ftengine.core.kernels import LoRAWeights
from ftengine.plugins.models import _moe
from ftengine.plugins.models._causal_lm import causal_lm_forward

GetOp = Callable[[str], Callable[..., Any]]
"""``get_op(name)``: the kernel op of that name from the active backend (what a patched forward calls).

.. versionadded:: 0.1
"""

ACTIVATIONS: dict[str, str] = {
    "silu": "swiglu",
    "swish": "swiglu",
    "gelu_pytorch_tanh": "geglu_tanh",
    "gelu_new": "geglu_tanh",
    "gelu": "geglu",
}
"""Hugging Face ``hidden_act`` -> the ``lora_mlp`` activation that computes the same gate."""

USED_OPS = ("rms_norm", "rope", "swiglu", "geglu", "linear_cross_entropy", "lora_linear", "lora_mlp", "lora_qkv",
            "lora_moe")

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "qkv_proj", "o_proj", "gate_proj", "up_proj", "gate_up_proj", "down_proj")
"""Projection attributes of the patched attention and MLP modules (separate or fused)."""

_PATCHED = "_ftengine_patched"
DECODE_ROWS = 64
"""Without autograd, a forward over at most this many rows (a decode step: one row a sequence) runs the
module's own forward: there the host's time per launch sets the speed, and transformers' modules launch
fewer host-heavy calls than the fused ops, whose gains (less memory kept for the backward, fewer passes
over large activations) need a backward or many rows."""


@dataclass(frozen=True)
class PatchTable:
    """What to patch in one family, by Hugging Face class name.

    Attributes:
        norms: RMSNorm classes.
        norm_offset: ``0.0`` (``w * x_hat``) or ``1.0`` (Gemma: ``(1 + w) * x_hat``).
        attentions: attention classes whose q/k/v/o projections and rotary step are replaced.
        attention_kwargs: ``(keyword, attribute)`` pairs passed from the attention module to the
            attention function, e.g. ``("sliding_window", "sliding_window")``; a dotted attribute is
            read through the module (``"config.sliding_window"``).
        mlps: gated MLP classes (``gate_proj``, ``up_proj``, ``down_proj``, ``act_fn``).
        fused_qkv: attribute of one projection holding q, k and v rows in that order (Phi-3's
            ``qkv_proj``), split after it runs; ``None``: separate ``q_proj``/``k_proj``/``v_proj``.
        fused_gate_up: attribute of one projection holding the gate rows then the up rows (Phi-3's
            ``gate_up_proj``); ``None``: separate ``gate_proj``/``up_proj``.
        causal_lms: classes whose forward gets the fused LM-head loss.
        final_softcap: config attribute of the final logit softcap (Gemma 2/3), or ``None``.
        decoder: the attribute of a causal-LM class holding the decoder (``model``).
        moes: sparse mixture-of-experts blocks (a ``gate`` router and fused ``experts``), run on ``lora_moe``.
        custom: ``(class name, factory)`` pairs for a family's own blocks (Mllama's cross-attention):
            ``factory(get_op)`` returns the forward, written on the helpers here (:func:`linear_projection`,
            :func:`attention_function`).

    The norms, attentions and MLPs keep their class's own forward for decode steps (no autograd, at most
    :data:`DECODE_ROWS` rows), so that forward must still run on the patched module; ``moes`` and ``custom``
    blocks always run the patched forward.

    .. versionadded:: 0.1
    """

    norms: tuple[str, ...]
    attentions: tuple[str, ...]
    mlps: tuple[str, ...]
    causal_lms: tuple[str, ...]
    norm_offset: float = 0.0
    attention_kwargs: tuple[tuple[str, str], ...] = ()
    final_softcap: str | None = None
    decoder: str = "model"
    moes: tuple[str, ...] = ()
    fused_qkv: str | None = None
    fused_gate_up: str | None = None
    custom: tuple[tuple[str, Callable[[GetOp], Callable[..., Any]]], ...] = ()


# --------------------------------------------------------------------------- routing of projections


def _peft_lora_layer() -> type | None:
    try:
        from peft.tuners.lora import LoraLayer
    except ImportError:
        return None
    return LoraLayer


def _quant_state(module: nn.Module) -> Any:
    """A bitsandbytes 4-bit layer's ``QuantState``, or ``None``. The weight carries it; when FSDP
    swaps the weight for its all-gathered plain tensor, the layer's own copy still holds it."""
    if type(module).__name__ not in ("Linear4bit", "LinearNF4"):
        return None
    state = getattr(module.weight, "quant_state", None)
    return state if state is not None else getattr(module, "quant_state", None)


def _base_weights(base: nn.Module) -> tuple[LoRAWeights | None, str]:
    """The frozen base of a projection as :class:`LoRAWeights` (no adapter), or why not."""
    state = _quant_state(base)
    if state is not None:
        if getattr(state, "quant_type", "nf4") != "nf4":
            return None, f"4-bit {state.quant_type} base"
        if getattr(state, "packing_format_for_cpu", False):  # bitsandbytes' CPU inference layout
            return None, "4-bit weight repacked for CPU inference"
        return LoRAWeights(weight=base.weight, bias=base.bias, quant_state=state), "nf4"
    if type(base) is not nn.Linear:
        return None, f"{type(base).__name__} base"
    if base.weight.requires_grad:
        return None, "trainable base weight"
    return LoRAWeights(weight=base.weight, bias=base.bias), "linear"


def route(module: nn.Module) -> tuple[LoRAWeights | None, str]:
    """How one projection runs: ``(weights, kind)`` for the fused ops, or ``(None, reason)``.

    Args:
        module: a projection as it is now (``nn.Linear``, bitsandbytes ``Linear4bit`` or a peft
            LoRA layer wrapping one).

    Returns:
        ``(LoRAWeights, "lora" | "linear" | "nf4" | "lora+nf4")`` when a fused op can compute it,
        else ``(None, reason)`` and the caller calls the module.
    """
    lora_layer = _peft_lora_layer()
    if lora_layer is None or not isinstance(module, lora_layer):
        return _base_weights(module)
    if module.merged:
        return None, "merged adapter"
    base, kind = _base_weights(module.get_base_layer())
    if base is None:
        return None, kind
    if module.disable_adapters:
        return base, kind
    active = [name for name in module.active_adapters if name in module.lora_A]
    if not active:
        return base, kind
    if len(active) > 1:
        return None, "several active adapters"
    name = active[0]
    if name in getattr(module, "lora_variant", {}) or getattr(module, "use_dora", {}).get(name, False):
        return None, "DoRA or another LoRA variant"
    dropout = module.lora_dropout[name]
    if not isinstance(dropout, nn.Identity) and dropout.training and dropout.p > 0:
        return None, "LoRA dropout"
    a, b = module.lora_A[name], module.lora_B[name]
    if not isinstance(a, nn.Linear) or not isinstance(b, nn.Linear) or b.bias is not None:
        return None, "LoRA bias or non-linear adapter"
    base.lora_a, base.lora_b, base.scaling = a.weight, b.weight, float(module.scaling[name])
    return base, "lora+nf4" if kind == "nf4" else "lora"


_FALLBACK_WARNED: set[str] = set()


def _note_fallback(what: str, reason: str) -> None:
    key = f"{what}: {reason}"
    if key not in _FALLBACK_WARNED:
        _FALLBACK_WARNED.add(key)
        warnings.warn(f"ftengine: {what} runs unfused ({reason}); peft's own path computes it", stacklevel=3)


def _project(get_op: GetOp, modules: list[nn.Module], x: torch.Tensor, what: str) -> list[torch.Tensor] | None:
    """``[w(x) for w in modules]`` through the fused ops when every module routes, else ``None``."""
    routes = [route(m) for m in modules]
    missing = [reason for weights, reason in routes if weights is None]
    if missing:
        _note_fallback(what, missing[0])
        return None
    weights = [w for w, _ in routes]
    if len(weights) == 3:
        return list(get_op("lora_qkv")(x, *weights))
    w = weights[0]
    return [get_op("lora_linear")(x, w.weight, w.lora_a, w.lora_b, w.scaling, w.bias, w.quant_state)]


# --------------------------------------------------------------------------- the forwards


def _norm_forward(get_op: GetOp, offset: float) -> Callable[..., torch.Tensor]:
    def forward(self: nn.Module, hidden_states: torch.Tensor) -> torch.Tensor:
        eps = getattr(self, "variance_epsilon", None)
        eps = self.eps if eps is None else eps
        return get_op("rms_norm")(hidden_states, self.weight, eps, offset)

    return forward


def _gate(get_op: GetOp, activation: str, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """``act(gate) * up`` on the element-wise op matching a ``lora_mlp`` activation name."""
    if activation == "swiglu":
        return get_op("swiglu")(gate, up)
    return get_op("geglu")(gate, up, "tanh" if activation == "geglu_tanh" else "none")


def linear_projection(get_op: GetOp, module: nn.Module, x: torch.Tensor, what: str) -> torch.Tensor:
    """``module(x)`` through the ``lora_linear`` op when the module routes (a plain, 4-bit or LoRA-wrapped
    ``nn.Linear`` whose adapters the op serves), else the module itself (peft's path); ``what`` names the
    projection in the fallback report (``"cross-attention q_proj"``). For :attr:`PatchTable.custom` forwards.

    .. versionadded:: 0.1
    """
    projected = _project(get_op, [module], x, what)
    return projected[0] if projected is not None else module(x)


def _mlp_forward(get_op: GetOp, activation: str) -> Callable[..., torch.Tensor]:
    def forward(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
        routes = [route(m) for m in (self.gate_proj, self.up_proj, self.down_proj)]
        if all(w is not None for w, _ in routes):
            return get_op("lora_mlp")(x, *(w for w, _ in routes), activation=activation)
        _note_fallback("MLP", next(reason for w, reason in routes if w is None))
        return self.down_proj(_gate(get_op, activation, self.gate_proj(x), self.up_proj(x)))

    return forward


def _fused_mlp_forward(get_op: GetOp, activation: str, gate_up: str) -> Callable[..., torch.Tensor]:
    """A gated MLP whose gate and up rows share one projection: one ``lora_linear`` (LoRA on the fused
    weight), split in halves, the gate op, and ``lora_linear`` for ``down_proj``."""

    def forward(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
        fused = linear_projection(get_op, getattr(self, gate_up), x, f"MLP {gate_up}")  # (B, T, 2I)
        gate, up = fused.chunk(2, dim=-1)  # (B, T, I) each
        return linear_projection(get_op, self.down_proj, _gate(get_op, activation, gate, up), "MLP down_proj")

    return forward


def _qkv(get_op: GetOp, module: nn.Module, x: torch.Tensor, fused: str | None) -> list[torch.Tensor]:
    """q, k and v projections ``(B, T, heads * D)``: one ``lora_qkv`` over three projections, or one
    ``lora_linear`` over a fused projection split into its q, k and v rows."""
    if fused is None:
        projections = [module.q_proj, module.k_proj, module.v_proj]
        qkv = _project(get_op, projections, x, "attention q/k/v")
        return qkv if qkv is not None else [p(x) for p in projections]
    qkv = linear_projection(get_op, getattr(module, fused), x, f"attention {fused}")
    q_size = module.config.num_attention_heads * module.head_dim
    kv_size = (qkv.shape[-1] - q_size) // 2
    return list(qkv.split([q_size, kv_size, kv_size], dim=-1))


def _rotate(get_op: GetOp, q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor,
            sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The rope op on q and k; with partial rotary (cos narrower than a head, Phi-4-mini) only the first
    ``cos.shape[-1]`` dimensions of each head turn and the rest pass through."""
    rotary = cos.shape[-1]
    if rotary == q.shape[-1]:
        return get_op("rope")(q, k, cos, sin)
    q_rot, k_rot = get_op("rope")(q[..., :rotary], k[..., :rotary], cos, sin)
    return torch.cat((q_rot, q[..., rotary:]), dim=-1), torch.cat((k_rot, k[..., rotary:]), dim=-1)


_MISSING = object()


def _dropout(module: nn.Module) -> float:
    """The attention dropout probability (``attention_dropout``; Mllama's text attention calls it ``dropout``)."""
    p = getattr(module, "attention_dropout", None)
    return getattr(module, "dropout", 0.0) if p is None else p


def _attribute(module: nn.Module, path: str) -> Any:
    """``module.<path>`` for a dotted path, or ``_MISSING``."""
    return functools.reduce(lambda obj, name: getattr(obj, name, _MISSING), path.split("."), module)


def _attention_forward(get_op: GetOp, attention_kwargs: tuple[tuple[str, str], ...],
                       fused_qkv: str | None = None) -> Callable[..., Any]:
    def forward(
        self: nn.Module,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
        attention_mask: torch.Tensor | None = None,
        past_key_values: Any = None,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        batch_shape = hidden_states.shape[:-1]  # (B, T)
        qkv = _qkv(get_op, self, hidden_states, fused_qkv)
        # (B, T, heads * D) -> (B, heads, T, D)
        q, k, v = (t.view(*batch_shape, -1, self.head_dim).transpose(1, 2) for t in qkv)
        if hasattr(self, "q_norm"):
            q, k = self.q_norm(q), self.k_norm(k)
        cos, sin = position_embeddings
        q, k = _rotate(get_op, q, k, cos, sin)
        if past_key_values is not None:
            k, v = past_key_values.update(k, v, self.layer_idx)
        attend = attention_function(self)
        extra = {key: _attribute(self, attr) for key, attr in attention_kwargs}
        extra = {key: value for key, value in extra.items() if value is not _MISSING}
        out, weights = attend(
            self,
            q,
            k,
            v,
            attention_mask,
            dropout=_dropout(self) if self.training else 0.0,
            scaling=self.scaling,
            **extra,
            **kwargs,
        )
        out = out.reshape(*batch_shape, -1).contiguous()  # (B, T, heads * D)
        return linear_projection(get_op, self.o_proj, out, "attention o_proj"), weights

    return forward


def attention_function(module: nn.Module) -> Callable[..., Any]:
    """The attention function the model is configured with (``config._attn_implementation`` looked up in
    transformers' registry; "eager" is the module's own family's ``eager_attention_forward``), called as
    transformers' attention modules call it. For :attr:`PatchTable.custom` forwards.

    .. versionadded:: 0.1
    """
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    implementation = module.config._attn_implementation
    if implementation in (None, "eager"):
        return sys.modules[type(module).__module__].eager_attention_forward
    return ALL_ATTENTION_FUNCTIONS[implementation]


# --------------------------------------------------------------------------- patch / unpatch


def _is_patched(module: nn.Module) -> bool:
    """Read on the instance itself: wrappers such as peft's forward attribute lookups to the model they wrap."""
    return _PATCHED in module.__dict__


def _set_forward(module: nn.Module, function: Callable[..., Any]) -> None:
    module.forward = types.MethodType(function, module)
    module.__dict__[_PATCHED] = module.forward  # ours, to tell it from a later wrapper (trl's fused LM head)


def _eager_when_decoding(function: Callable[..., Any], original: Callable[..., Any]) -> Callable[..., Any]:
    """``function``, except that a forward without autograd over at most :data:`DECODE_ROWS` rows of hidden
    states (the first argument, or ``hidden_states=``) runs ``original``, the class's own forward."""

    @functools.wraps(function)
    def forward(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
        if not torch.is_grad_enabled():
            hidden = args[0] if args else kwargs.get("hidden_states")
            if torch.is_tensor(hidden) and hidden.numel() <= DECODE_ROWS * hidden.shape[-1]:
                return original(self, *args, **kwargs)
        return function(self, *args, **kwargs)

    return forward


def _mlp_activation(module: nn.Module) -> tuple[str, str | None]:
    """``(hidden_act, lora_mlp activation or None)`` of a gated MLP: from its config, or, for an MLP that keeps no
    config (Qwen2.5-VL's vision MLP), from the class of its ``act_fn``."""
    config = getattr(module, "config", None)
    if config is not None:
        hidden_act = getattr(config, "hidden_activation", None) or config.hidden_act
        return hidden_act, ACTIVATIONS.get(hidden_act)
    from transformers.activations import ACT2FN

    act_fn = type(getattr(module, "act_fn", None))
    hidden_act = next((name for name in ACTIVATIONS if type(ACT2FN[name]) is act_fn), act_fn.__name__)
    return hidden_act, ACTIVATIONS.get(hidden_act)


def patch_model(model: nn.Module, get_op: GetOp, table: PatchTable) -> list[str]:
    """Give every module matching ``table`` a forward on the kernel ops.

    Args:
        model: a Hugging Face model (before or after peft wraps it).
        get_op: the core's op lookup; every op is resolved here, once.
        table: the family's classes.

    Returns:
        one line per kind of thing patched, e.g. ``"rms_norm x9 -> triton"``.
    """
    from ftengine.core.kernels import op_table

    backends = op_table()
    quantized = 0
    if table.moes and getattr(model, "is_loaded_in_4bit", False):  # bitsandbytes leaves 3-D experts 16-bit
        quantized = _moe.quantize_experts(model, get_op, table.moes)
    resolved = {name: get_op(name) for name in USED_OPS}  # once, not on every forward
    get_op = resolved.__getitem__
    counts: Counter[str] = Counter()
    skipped: list[str] = []
    for module in list(model.modules()):
        cls = type(module).__name__
        if _is_patched(module):
            continue
        if cls in table.norms:
            _set_forward(module, _eager_when_decoding(_norm_forward(get_op, table.norm_offset), type(module).forward))
            counts["rms_norm"] += 1
        elif cls in table.attentions:
            forward = _attention_forward(get_op, table.attention_kwargs, table.fused_qkv)
            _set_forward(module, _eager_when_decoding(forward, type(module).forward))
            counts["attention"] += 1
        elif cls in table.mlps:
            hidden_act, activation = _mlp_activation(module)
            if activation is None:
                skipped.append(f"MLP {cls}: activation {hidden_act!r} has no fused op (left as is)")
                continue
            forward = (_mlp_forward(get_op, activation) if table.fused_gate_up is None
                       else _fused_mlp_forward(get_op, activation, table.fused_gate_up))
            _set_forward(module, _eager_when_decoding(forward, type(module).forward))
            counts[f"mlp:{activation}"] += 1
        elif cls in table.moes:
            hidden_act = _moe.base_experts(module.experts).config.hidden_act
            if ACTIVATIONS.get(hidden_act) is None:
                skipped.append(f"MoE {cls}: activation {hidden_act!r} has no fused op (left as is)")
                continue
            _set_forward(module, _moe.block_forward(get_op, ACTIVATIONS[hidden_act]))
            counts["moe"] += 1
        elif cls in dict(table.custom):
            _set_forward(module, dict(table.custom)[cls](get_op))
            counts[f"custom:{cls}"] += 1
        elif cls in table.causal_lms:
            _set_forward(module, causal_lm_forward(get_op, type(module).forward, table.final_softcap, table.decoder))
            module.__dict__[FUSED_LOSS_ATTR] = True
            counts["loss"] += 1
    lines = []
    if counts["rms_norm"]:
        lines.append(f"rms_norm x{counts['rms_norm']} -> {backends['rms_norm']}")
    if counts["attention"]:
        n = counts["attention"]
        qkv = (f"q/k/v x{n} -> lora_qkv ({backends['lora_qkv']})" if table.fused_qkv is None
               else f"{table.fused_qkv} x{n} -> lora_linear ({backends['lora_linear']}), split")
        lines.append(f"attention {qkv}, rope -> {backends['rope']}, o_proj -> lora_linear ({backends['lora_linear']})")
    for key, n in sorted(counts.items()):
        if key.startswith("mlp:") and table.fused_gate_up is None:
            lines.append(f"mlp x{n} -> lora_mlp {key[4:]} ({backends['lora_mlp']})")
        elif key.startswith("mlp:"):
            gate = "swiglu" if key[4:] == "swiglu" else "geglu"
            lines.append(f"mlp {table.fused_gate_up} x{n} -> lora_linear ({backends['lora_linear']}), split, "
                         f"{gate} ({backends[gate]}), down_proj -> lora_linear")
    if counts["moe"]:
        lines.append(f"moe experts x{counts['moe']} -> lora_moe grouped GEMMs ({backends['lora_moe']})")
    for key, n in sorted(counts.items()):
        if key.startswith("custom:"):
            lines.append(f"{key[7:]} x{n} -> lora_linear projections ({backends['lora_linear']})")
    if quantized:
        lines.append(f"moe experts x{quantized} stored NF4 ({backends['quantize_nf4']}), unpacked a layer at a "
                     "time for the grouped GEMMs")
    if counts["loss"]:
        softcap = " with final logit softcap" if table.final_softcap else ""
        lines.append(f"causal-LM loss -> linear_cross_entropy{softcap} ({backends['linear_cross_entropy']}), "
                     "no logits when training with labels")
    return lines + skipped


def unpatch_model(model: nn.Module) -> int:
    """Restore the class forwards on every module :func:`patch_model` changed; returns how many.

    A module whose forward something else has wrapped since (trl's fused LM head, say) keeps that
    wrapper, and with it ours underneath: removing ours would cut the wrapper's chain.
    """
    restored = 0
    for module in model.modules():
        if _is_patched(module) and module.__dict__.get("forward") is module.__dict__[_PATCHED]:
            del module.forward
            del module.__dict__[_PATCHED]
            module.__dict__.pop(FUSED_LOSS_ATTR, None)
            restored += 1
    return restored


def routing_report(model: nn.Module) -> list[str]:
    """How the projections of a patched model run now (call after LoRA is attached).

    Returns:
        one line per route, e.g. ``"fused lora x196"`` or ``"peft path (LoRA dropout) x196"``.
    """
    counts: Counter[str] = Counter()
    seen = set()
    for module in model.modules():
        if not _is_patched(module):
            continue
        for child_name in PROJECTIONS:
            child = getattr(module, child_name, None)
            if child is None or id(child) in seen:
                continue
            seen.add(id(child))
            weights, kind = route(child)
            counts[f"fused {kind}" if weights is not None else f"peft path ({kind})"] += 1
        experts = getattr(module, "experts", None)
        if experts is not None:
            weights, kind = _moe.route_experts(experts)
            counts[f"experts fused {kind}" if weights is not None else f"experts unfused ({kind})"] += 1
    return [f"{key} x{n}" for key, n in sorted(counts.items())]
