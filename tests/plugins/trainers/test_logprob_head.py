"""The preference and RL trainers score tokens with the token_logprobs op, and their losses and
gradients equal trl's own computation (its fused LM head, or ORPO's full logits) on the same model
and batch."""

from __future__ import annotations

import types

import pytest
import torch

from ftengine.plugins.trainers import logprob_head
from ftengine.plugins.trainers import paired

from .helpers import build
from .helpers import dataset
from .helpers import lora_model


@pytest.fixture
def op_calls(monkeypatch):
    """The row counts of every token_logprobs call made by the trainers."""
    calls = []
    real = logprob_head.get_op

    def counting_get_op(name):
        op = real(name)

        def counted(hidden, *args, **kwargs):
            calls.append(hidden.shape[0])
            return op(hidden, *args, **kwargs)

        return counted

    monkeypatch.setattr(logprob_head, "get_op", counting_get_op)
    monkeypatch.setattr(paired, "get_op", counting_get_op)
    return calls


def loss_and_grads(trainer, model, batch):
    model.zero_grad()
    loss = trainer.compute_loss(model, dict(batch))
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return loss.detach(), grads


def assert_same(ours, theirs):
    (loss_a, grads_a), (loss_b, grads_b) = ours, theirs
    assert torch.allclose(loss_a, loss_b, rtol=1e-5, atol=1e-6), (loss_a, loss_b)
    assert grads_a and grads_a.keys() == grads_b.keys()
    for name in grads_a:
        error = (grads_a[name] - grads_b[name]).norm() / grads_b[name].norm().clamp(min=1e-12)
        assert error < 1e-4, (name, error)


def trl_trainer(name, model, tokenizer, data, tmp_path, monkeypatch, options):
    """The same trainer with trl's own log-probability head (ours not installed)."""
    from ftengine.plugins.trainers import dpo
    from ftengine.plugins.trainers import grpo

    for module in (dpo, grpo):
        monkeypatch.setattr(module, "install_on_trainer", lambda trainer, temperature=1.0: "trl's head")
    return build(name, model, tokenizer, data, tmp_path, options)


@pytest.mark.parametrize(("name", "options"), [
    ("dpo", {"beta": 0.1}), ("dpo", {"loss_type": "ipo", "beta": 0.5}), ("kto", {"desirable_weight": 1.5}),
])
def test_dpo_and_kto_losses_equal_trls(name, options, demo_base, tmp_path, monkeypatch, op_calls):
    model, tokenizer = lora_model(demo_base)
    data = dataset(name, tokenizer, tmp_path)
    ours = build(name, model, tokenizer, data, tmp_path, options)
    batch = next(iter(ours.get_train_dataloader()))
    mine = loss_and_grads(ours, model, batch)
    assert op_calls and len(op_calls) >= 2  # the policy and the reference (adapter off)
    theirs = trl_trainer(name, model, tokenizer, data, tmp_path, monkeypatch, options)
    calls = len(op_calls)
    assert_same(mine, loss_and_grads(theirs, model, batch))
    assert len(op_calls) == calls


def test_orpo_loss_equals_trls_full_logits(demo_base, tmp_path, op_calls):
    from trl.experimental.orpo import ORPOTrainer

    model, tokenizer = lora_model(demo_base)
    trainer = build("orpo", model, tokenizer, dataset("orpo", tokenizer, tmp_path), tmp_path, {"beta": 0.2})
    batch = next(iter(trainer.get_train_dataloader()))
    mine = loss_and_grads(trainer, model, batch)
    ours_metrics = trainer._stored_metrics["train"]
    assert len(op_calls) == 1
    trainer.concatenated_forward = types.MethodType(ORPOTrainer.concatenated_forward, trainer)
    assert_same(mine, loss_and_grads(trainer, model, batch))
    for key in ("nll_loss", "log_odds_ratio", "logps/chosen", "logps/rejected", "rewards/margins"):
        assert ours_metrics[key][0] == pytest.approx(ours_metrics[key][1], rel=1e-5), key


def test_grpo_loss_equals_trls(demo_base, tmp_path, monkeypatch, op_calls):
    model, tokenizer = lora_model(demo_base)
    data = dataset("grpo", tokenizer, tmp_path)
    options = {"reward_funcs": ["exact_match", "format"], "num_generations": 4, "max_completion_length": 6,
               "beta": 0.05, "temperature": 0.8}
    ours = build("grpo", model, tokenizer, data, tmp_path, options)
    torch.manual_seed(0)
    inputs = ours._generate_and_score_completions(next(iter(ours.get_train_dataloader())))
    assert inputs["completion_ids"].shape[0] == 4 and inputs["ref_per_token_logps"] is not None
    ours.current_gradient_accumulation_steps = 1  # set by train(), which this test does not run
    mine = loss_and_grads(ours, model, inputs)
    assert op_calls  # the policy (and the reference with beta > 0)
    theirs = trl_trainer("grpo", model, tokenizer, data, tmp_path, monkeypatch, options)
    theirs.current_gradient_accumulation_steps = 1
    assert_same(mine, loss_and_grads(theirs, model, inputs))


def test_models_the_op_cannot_serve_keep_trls_head(demo_base):
    model, _ = lora_model(demo_base)
    base = model.get_base_model()
    base.config.logit_scale = 0.5
    before = base.forward
    assert "scaled logits" in logprob_head.use_token_logprobs(base)
    assert base.forward == before
