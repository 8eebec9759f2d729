"""The causal-LM forward a patch gives the model class: with labels in training, the decoder's hidden states
go straight into the fused LM-head loss (``linear_cross_entropy``) and no logits are built; a mixture of
experts adds its router loss as transformers does. Without labels, in eval mode, or with an LM head the
fused op cannot use, the class's own forward runs.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from typing import TYPE_CHECKING
from typing import Any

import torch
from torch import nn

from ftengine.core.kernels import begin_forward
from ftengine.plugins.models import _moe

if TYPE_CHECKING:
    from ftengine.plugins.models._patching import GetOp

LOSS_ONLY_KWARGS = ("num_items_in_batch", "shift_labels", "ignore_index")


def causal_lm_forward(get_op: GetOp, original: Callable[..., Any], softcap_attr: str | None, decoder: str):
    from transformers.modeling_outputs import CausalLMOutputWithPast
    from transformers.modeling_outputs import MoeCausalLMOutputWithPast

    signature = inspect.signature(original)
    var_keyword = next((p.name for p in signature.parameters.values() if p.kind is p.VAR_KEYWORD), None)
    not_for_body = {"self", "labels", "logits_to_keep", var_keyword}

    @functools.wraps(original)
    def forward(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
        begin_forward()
        bound = signature.bind(self, *args, **kwargs)
        labels = bound.arguments.get("labels")
        head = fused_lm_head(self)
        if labels is None or not self.training or head is None:
            return original(self, *args, **kwargs)
        inputs = {k: v for k, v in bound.arguments.items() if k not in not_for_body}
        extra = dict(bound.arguments.get(var_keyword, {})) if var_keyword else {}
        loss_kwargs = {k: extra.pop(k) for k in LOSS_ONLY_KWARGS if k in extra}
        body = getattr(self, decoder)
        if "output_router_logits" in inputs and inputs["output_router_logits"] is None:
            inputs["output_router_logits"] = getattr(self.config, "output_router_logits", False)
        if "labels" in inspect.signature(body.forward).parameters:  # multimodal bodies mask with the labels
            inputs["labels"] = labels
        outputs = body(**inputs, **extra)
        hidden = outputs.last_hidden_state  # (B, T, H)
        text_config = self.config.get_text_config()
        softcap = getattr(text_config, softcap_attr, None) if softcap_attr else None
        if type(head.weight).__name__ == "DTensor":  # sharded in its own FSDP2 unit: only its forward gathers it
            logits = head(hidden) if softcap is None else softcap * torch.tanh(head(hidden) / softcap)
            loss = self.loss_function(logits, labels, text_config.vocab_size, **loss_kwargs)
        else:
            loss = causal_lm_loss(get_op, hidden, head.weight, labels, softcap, **loss_kwargs)
        aux = _moe.aux_loss(self, outputs, inputs.get("attention_mask"))
        if aux is not None:
            loss = loss + self.config.router_aux_loss_coef * aux
            return MoeCausalLMOutputWithPast(loss=loss, aux_loss=aux, router_logits=outputs.router_logits,
                                             past_key_values=getattr(outputs, "past_key_values", None))
        return CausalLMOutputWithPast(
            loss=loss,
            logits=None,
            past_key_values=getattr(outputs, "past_key_values", None),
            hidden_states=getattr(outputs, "hidden_states", None),
            attentions=getattr(outputs, "attentions", None),
        )

    return forward


def fused_lm_head(model: nn.Module) -> nn.Linear | None:
    """The LM head when the fused loss can use its weight: a plain ``nn.Linear`` without bias, or the class
    FSDP2's ``fully_shard`` makes of one.

    accelerate's FSDP2 puts the final norm and the LM head in one unit kept gathered after its forward, so
    once the body has run the head's weight is a whole tensor; a head whose weight is still a sharded
    ``DTensor`` then (a unit of its own, gathered only by its own forward) is called for the logits instead.
    """
    head = getattr(model, "lm_head", None)
    if not _plain_linear(head) or head.bias is not None:
        return None
    return head


def _plain_linear(module: Any) -> bool:
    """``nn.Linear`` itself, or the class FSDP2's ``fully_shard`` makes of it (``FSDPLinear``): not a subclass
    with its own forward (bitsandbytes' 4-bit layer, a LoRA layer)."""
    if type(module) is nn.Linear:
        return True
    bases = type(module).__bases__
    return len(bases) == 2 and bases[0].__name__ == "FSDPModule" and bases[1] is nn.Linear


def causal_lm_loss(
    get_op: GetOp,
    hidden: torch.Tensor,
    head_weight: torch.Tensor,
    labels: torch.Tensor,
    softcap: float | None = None,
    num_items_in_batch: Any = None,
    shift_labels: torch.Tensor | None = None,
    ignore_index: int = -100,
) -> torch.Tensor:
    """Next-token cross-entropy of ``hidden @ head_weight.T`` without building the logits.

    Position ``t`` predicts ``labels[t + 1]``: the labels are shifted left and padded with
    ``ignore_index`` (or ``shift_labels`` is used as given). The mean is over non-ignored tokens,
    or, with ``num_items_in_batch`` (the trainer's count across accumulated micro-batches), the
    sum divided by it, as Hugging Face's causal-LM loss does.
    """
    if shift_labels is None:
        shift_labels = nn.functional.pad(labels[..., 1:], (0, 1), value=ignore_index)  # (B, T)
    shift_labels = shift_labels.reshape(-1).to(hidden.device)
    flat = hidden.reshape(-1, hidden.shape[-1])  # (B*T, H)
    loss = get_op("linear_cross_entropy")(flat, head_weight, shift_labels, ignore_index, softcap)
    if num_items_in_batch is not None:
        n_valid = (shift_labels != ignore_index).sum()
        if torch.is_tensor(num_items_in_batch):
            num_items_in_batch = num_items_in_batch.to(loss.device)
        loss = loss * n_valid / num_items_in_batch
    return loss
