"""The public functions of the two LM-head ops, shared by every backend.

``linear_cross_entropy`` and ``token_logprobs`` take hidden states and labels with any leading
dims; each backend implements them as a ``torch.autograd.Function`` over flat rows. The factories
here build the op with its contract signature (:mod:`ftengine.core.kernels`) around that Function:
flatten to ``(N, H)`` rows and ``(N,)`` labels, check that they pair up, and hand them over
contiguous.
"""

from __future__ import annotations

from collections.abc import Callable

import torch


def flat_rows(hidden: torch.Tensor, labels: torch.Tensor, op: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``hidden`` as contiguous ``(N, H)`` rows and ``labels`` as contiguous ``(N,)``.

    Raises:
        ValueError: the row counts differ.
    """
    hidden = hidden.reshape(-1, hidden.shape[-1])
    labels = labels.reshape(-1)
    if labels.shape[0] != hidden.shape[0]:
        raise ValueError(f"{op}: {hidden.shape[0]} hidden rows but {labels.shape[0]} labels")
    return hidden.contiguous(), labels.contiguous()


def linear_cross_entropy_op(function: type[torch.autograd.Function]) -> Callable[..., torch.Tensor]:
    """``linear_cross_entropy`` over ``function.apply(hidden_rows, weight, labels, ignore_index, softcap)``."""

    def linear_cross_entropy(
        hidden: torch.Tensor,
        lm_head_weight: torch.Tensor,
        labels: torch.Tensor,
        ignore_index: int = -100,
        softcap: float | None = None,
    ) -> torch.Tensor:
        """Mean cross-entropy of ``hidden @ lm_head_weight.T`` against ``labels``, chunked over tokens.

        Args:
            hidden: ``(..., H)`` final hidden states.
            lm_head_weight: ``(V, H)``.
            labels: ``(...)`` target ids, already shifted; ``ignore_index`` marks tokens without a loss.
            ignore_index: label value to skip.
            softcap: if set, logits become ``softcap * tanh(logits / softcap)`` first (Gemma-2).

        Returns:
            The fp32 scalar loss, averaged over the non-ignored tokens.
        """
        rows, targets = flat_rows(hidden, labels, "linear_cross_entropy")
        return function.apply(rows, lm_head_weight, targets, int(ignore_index),
                              None if softcap is None else float(softcap))

    return linear_cross_entropy


def token_logprobs_op(function: type[torch.autograd.Function]) -> Callable[..., torch.Tensor | tuple[torch.Tensor,
                                                                                                     torch.Tensor]]:
    """``token_logprobs`` over ``function.apply(hidden_rows, weight, labels, softcap, temperature, with_stats)``."""

    def token_logprobs(
        hidden: torch.Tensor,
        lm_head_weight: torch.Tensor,
        labels: torch.Tensor,
        softcap: float | None = None,
        temperature: float = 1.0,
        with_stats: bool = False,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """See :mod:`ftengine.core.kernels` for the contract."""
        rows, targets = flat_rows(hidden, labels, "token_logprobs")
        return function.apply(rows, lm_head_weight, targets, softcap, temperature, with_stats)

    return token_logprobs
