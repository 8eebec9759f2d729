"""The LM head of the preference and RL trainers through the ``token_logprobs`` kernel op.

trl's DPO, KTO and GRPO trainers call the policy (and the reference: the same model with its
adapter disabled, or a frozen copy) as ``model(..., labels=labels, fused_lm_head=True)`` and read
per-token ``log_probs`` (plus ``entropy``, ``mean_logits`` and ``is_top1`` for their metrics) from
the output; trl patches that forward in when the trainer is built. :func:`use_token_logprobs`
replaces it with one that runs the backbone, keeps the positions whose next-token label is not
-100 and scores them with the kernel op, which never builds the ``[tokens x vocab]`` logits. Every
other call (``generate``, a plain forward) goes to the forward it wraps, unchanged.
"""

from __future__ import annotations

import types
from typing import Any

from ftengine.core.kernels import get_op

INSTALLED_ATTR = "ftengine_token_logprobs"


def _unsupported(model: Any) -> str | None:
    """Why the op cannot stand in for trl's head on this model (``None``: it can)."""
    config = model.config
    if config.get_text_config() is not config:
        return "a multimodal config"
    if any(getattr(config, key, None) not in (None, 1.0) for key in ("logit_scale", "output_multiplier",
                                                                      "lm_head_multiplier", "logits_scaling")):
        return "scaled logits"
    if getattr(config, "output_router_logits", False):
        return "MoE router losses"
    head = model.get_output_embeddings()
    if head is None or getattr(head, "bias", None) is not None:
        return "an LM head with a bias"
    return None


def use_token_logprobs(model: Any, temperature: float = 1.0) -> str:
    """Route ``model(..., fused_lm_head=True)`` calls through the ``token_logprobs`` op.

    Args:
        model: the causal LM trl patched (for peft, the base model under the adapters).
        temperature: what the logits are divided by (GRPO's sampling temperature).

    Returns:
        A line for the run summary.
    """
    from trl.trainer.utils import FusedCausalLMOutput

    why_not = _unsupported(model)
    if why_not:
        return f"log-probabilities: trl's fused LM head ({why_not})"
    previous = model.forward
    softcap = getattr(model.config, "final_logit_softcapping", None)
    op = get_op("token_logprobs")

    def forward(self, *args, fused_lm_head=False, labels=None, shift_labels=None, num_items_in_batch=None, **kwargs):
        if not fused_lm_head:
            return previous(*args, labels=labels, shift_labels=shift_labels, num_items_in_batch=num_items_in_batch,
                            **kwargs)
        kwargs["use_cache"] = False
        hidden = self.base_model(*args, **kwargs).last_hidden_state
        if shift_labels is None:
            hidden, labels = hidden[:, :-1], labels[:, 1:]
        else:
            labels = shift_labels
        weight = self.get_output_embeddings().weight
        hidden, labels = hidden.to(weight.device), labels.to(weight.device)
        mask = labels != -100
        logp, stats = op(hidden[mask], weight, labels[mask], softcap=softcap, temperature=temperature,
                         with_stats=True)
        # masked_scatter keeps an all-masked micro-batch connected to the graph (a zero gradient)
        log_probs = logp.new_zeros(mask.shape).masked_scatter(mask, logp)
        entropy, mean_logits, is_top1 = (stats.new_zeros(mask.shape).masked_scatter(mask, stats[:, i])
                                         for i in range(3))
        count = mask.sum().clamp(min=1) if num_items_in_batch is None else num_items_in_batch
        return FusedCausalLMOutput(loss=-log_probs.sum() / count, log_probs=log_probs, entropy=entropy,
                                   mean_logits=mean_logits, is_top1=is_top1.bool(), label_mask=mask)

    model.forward = types.MethodType(forward, model)
    setattr(model, INSTALLED_ATTR, True)
    return "log-probabilities: the token_logprobs op (no full logits)"


def install_on_trainer(trainer: Any, temperature: float = 1.0) -> str:
    """:func:`use_token_logprobs` on the policy a trl trainer patched, and on its separate reference model."""
    model = trainer.model
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    line = use_token_logprobs(base, temperature)
    reference = getattr(trainer, "ref_model", None)
    if reference is not None:
        reference = reference.get_base_model() if hasattr(reference, "get_base_model") else reference
        use_token_logprobs(reference, temperature)
    return line
