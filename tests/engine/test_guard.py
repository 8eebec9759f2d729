"""The weight check run after every optimizer step: the right tensor named, finite tensors whose norm overflows
not mistaken for broken ones, and one read-back in the common case instead of one a tensor."""

from __future__ import annotations

import pytest
import torch

from ftengine.engine import guard
from ftengine.engine.guard import first_non_finite


def named(**tensors):
    return list(tensors.items())


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_names_the_first_tensor_holding_a_non_finite_value(bad, dtype):
    tensors = named(a=torch.ones(3, dtype=dtype), steps=torch.tensor([7]), none=None,
                    b=torch.tensor([1.0, bad, 2.0], dtype=dtype), c=torch.tensor([bad]))
    assert first_non_finite(tensors) == "b"


def test_finite_tensors_whose_norm_overflows_are_finite():
    huge = torch.full((4,), 1e30)  # the squares overflow float32, the values do not
    assert first_non_finite(named(a=huge, b=torch.ones(2))) is None


def test_finite_tensors_are_checked_without_a_read_back_per_tensor(monkeypatch):
    calls = []
    monkeypatch.setattr(guard.torch, "isfinite", lambda t: calls.append(t) or torch.ones((), dtype=torch.bool))
    tensors = named(**{f"w{i}": torch.randn(8) for i in range(50)})
    assert first_non_finite(tensors) is None
    assert not calls
    assert first_non_finite(named() + [("meta", torch.empty(3, device="meta"))]) is None


@pytest.mark.parametrize("bad", [None, "loss", "gradient norm"])
def test_before_a_step_loss_and_gradients_cost_one_read_back(bad, monkeypatch):
    model = torch.nn.Linear(4, 3)
    model(torch.randn(2, 4)).sum().backward()
    if bad == "gradient norm":
        model.weight.grad[0, 0] = float("nan")
    watcher = guard.NonFiniteGuard()
    for loss in (torch.tensor(1.0), torch.tensor(float("inf") if bad == "loss" else 2.0)):
        flag = ~torch.isfinite(loss)
        watcher._bad_loss = flag if watcher._bad_loss is None else watcher._bad_loss | flag
    reads = []
    for method in ("tolist", "item", "__bool__", "__float__"):
        original = getattr(torch.Tensor, method)
        monkeypatch.setattr(torch.Tensor, method,
                            lambda self, *a, _o=original, _m=method: reads.append(_m) or _o(self, *a))
    assert watcher._problem(model, None) == bad
    assert reads == ["tolist"]
