"""Every ``loss_type`` the ``dpo`` trainer accepts equals its formula, computed here in float64 from
the papers' definitions with the full logits of an unpatched float64 Hugging Face + peft twin of
the trained model (the policy, and the reference: its adapter switched off); SimPO's gradients
too, and SimPO runs no reference."""

from __future__ import annotations

import copy
import typing

import pytest
import torch
import torch.nn.functional as F

from ftengine.plugins.trainers.options import DPO_LOSS_TYPES

from .helpers import build
from .helpers import dataset
from .helpers import lora_model

BETA, EPS, TAU = 0.3, 0.1, 0.05  # TAU: DiscoPOP's temperature, trl's default


def float64_twin(model, base):
    """Plain transformers + peft in float64 with ``model``'s adapter weights."""
    from peft import get_peft_model
    from peft import get_peft_model_state_dict
    from peft import set_peft_model_state_dict
    from transformers import AutoModelForCausalLM

    plain = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float64)
    twin = get_peft_model(plain, copy.deepcopy(model.peft_config["default"]))
    set_peft_model_state_dict(twin, {k: v.double() for k, v in get_peft_model_state_dict(model).items()})
    return twin


def token_logps(model, input_ids, attention_mask, scored):
    """Per-row sum and count of the log-probabilities of the tokens where ``scored`` (B, T) is set."""
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits.double()  # (B, T, V)
    logp = logits[:, :-1].log_softmax(-1).gather(-1, input_ids[:, 1:, None])[..., 0]  # (B, T-1)
    mask = scored[:, 1:].bool()
    return (logp * mask).sum(-1), mask.sum(-1).double()


def pair_loss(kind, pc, pr, rc, rr, nc, nr):
    """The per-pair loss of ``kind`` from summed log-probabilities (policy p, reference r; chosen c,
    rejected r) and answer lengths n."""
    ls, sig = F.logsigmoid, torch.sigmoid
    dc, dr = pc - rc, pr - rr  # the implicit rewards / beta
    d = dc - dr
    if kind == "sigmoid":  # DPO
        return -ls(BETA * d)
    if kind == "hinge":  # SLiC
        return torch.relu(1 - BETA * d)
    if kind == "ipo":  # IPO eq. 17, log-ratios averaged over answer tokens; beta is tau
        return (dc / nc - dr / nr - 1 / (2 * BETA)) ** 2
    if kind == "sigmoid_norm":
        return -ls(BETA * (dc / nc - dr / nr))
    if kind == "robust":  # unbiased under label flips with probability EPS
        return (-(1 - EPS) * ls(BETA * d) + EPS * ls(-BETA * d)) / (1 - 2 * EPS)
    if kind == "exo_pair":  # KL(softmax(beta * rewards) || (1 - EPS, EPS))
        qw, ql = sig(BETA * d), sig(-BETA * d)
        return qw * (torch.log(qw) - torch.log1p(torch.tensor(-EPS))) + ql * (torch.log(ql) - torch.log(
            torch.tensor(EPS)))
    if kind == "nca_pair":
        return -ls(BETA * dc) - 0.5 * ls(-BETA * dc) - 0.5 * ls(-BETA * dr)
    if kind == "bco_pair":
        return -ls(BETA * dc) - ls(-BETA * dr)
    if kind == "sppo_hard":
        return (dc - 1 / (2 * BETA)) ** 2 + (dr + 1 / (2 * BETA)) ** 2
    if kind in ("aot", "aot_unpaired"):  # sorted across the batch: an optimal-transport pairing
        a, b = ((pc - pr).sort().values, (rc - rr).sort().values) if kind == "aot" else (dc.sort().values,
                                                                                       dr.sort().values)
        return -(1 - EPS) * ls(BETA * (a - b)) - EPS * ls(-BETA * (a - b))
    if kind == "apo_zero":
        return 1 - sig(BETA * dc) + sig(BETA * dr)
    if kind == "apo_down":
        return sig(BETA * dc) + 1 - sig(BETA * d)
    if kind == "discopop":  # a logistic / exponential blend modulated by the scaled margin
        x = BETA * d
        mix = sig(x / TAU)
        return (1 - mix) * -ls(x) + mix * torch.exp(-x)
    raise AssertionError(kind)


def reference_dpo_loss(logps, kinds, weights):
    policy, reference, lengths = logps
    half = policy.shape[0] // 2
    total = torch.zeros((), dtype=torch.float64)
    for kind, weight in zip(kinds, weights, strict=True):
        if kind == "sft":  # the chosen answers' token-mean NLL
            per_pair = -policy[:half].sum() / lengths[:half].sum()
        else:
            per_pair = pair_loss(kind, policy[:half], policy[half:], reference[:half], reference[half:],
                                 lengths[:half], lengths[half:])
        total += weight * per_pair.mean()
    return total


@pytest.fixture(scope="module")
def dpo_setup(demo_base, tmp_path_factory):
    """The model, its data, a batch of the dpo trainer's and its float64 policy / reference
    log-probabilities, shared by the loss types (each still builds its own trainer)."""
    tmp_path = tmp_path_factory.mktemp("dpo-losses")
    model, tokenizer = lora_model(demo_base)
    data = dataset("dpo", tokenizer, tmp_path)
    batch = next(iter(build("dpo", model, tokenizer, data, tmp_path).get_train_dataloader()))
    twin = float64_twin(model, demo_base)
    ids, attention, completion = batch["input_ids"], batch["attention_mask"], batch["completion_mask"]
    with torch.no_grad():
        policy, lengths = token_logps(twin, ids, attention, completion)
        with twin.disable_adapter():
            reference, _ = token_logps(twin, ids, attention, completion)
    return model, tokenizer, data, tmp_path, batch, (policy, reference, lengths)


DPO_TYPES = [kind for kind in typing.get_args(DPO_LOSS_TYPES) if kind != "simpo"]


@pytest.mark.parametrize("kinds", [[kind] for kind in DPO_TYPES] + [["sigmoid", "sft"]], ids=str)
def test_each_dpo_loss_type_equals_its_float64_formula(kinds, dpo_setup):
    model, tokenizer, data, tmp_path, batch, logps = dpo_setup
    weights = [1.0] * len(kinds) if len(kinds) == 1 else [0.8, 0.2]
    options = {"loss_type": kinds if len(kinds) > 1 else kinds[0], "beta": BETA, "label_smoothing": EPS,
               "loss_weights": weights if len(kinds) > 1 else None}
    if kinds == ["hinge"] or kinds == ["ipo"]:
        options["label_smoothing"] = 0.0
    trainer = build("dpo", model, tokenizer, data, tmp_path, options)
    assert torch.equal(next(iter(trainer.get_train_dataloader()))["input_ids"], batch["input_ids"])
    with torch.no_grad():
        ours = trainer.compute_loss(model, dict(batch))
    assert ours.item() == pytest.approx(reference_dpo_loss(logps, kinds, weights).item(), rel=2e-5, abs=1e-6)


@pytest.mark.parametrize(("gamma", "alpha", "eps"), [(0.5, 0.0, 0.0), (0.3, 0.7, 0.1)])
def test_simpo_loss_and_gradients_equal_the_float64_formula(gamma, alpha, eps, demo_base, tmp_path, monkeypatch):
    from ftengine.plugins.trainers import paired

    model, tokenizer = lora_model(demo_base)
    options = {"loss_type": "simpo", "beta": 2.0, "simpo_gamma": gamma, "cpo_alpha": alpha, "label_smoothing": eps}
    trainer = build("dpo", model, tokenizer, dataset("dpo", tokenizer, tmp_path), tmp_path, options)
    assert getattr(trainer, "ref_model", None) is None
    calls = []
    real = paired.get_op
    monkeypatch.setattr(paired, "get_op", lambda name: calls.append(name) or real(name))
    batch = next(iter(trainer.get_train_dataloader()))
    model.zero_grad()
    loss = trainer.compute_loss(model, dict(batch))
    loss.backward()
    assert calls == ["token_logprobs"]  # one policy forward, no reference

    model64 = float64_twin(model, demo_base)
    sides = {}
    for side in ("chosen", "rejected"):
        answer = batch[f"{side}_labels"] != -100
        total, count = token_logps(model64, batch[f"{side}_input_ids"], batch[f"{side}_attention_mask"], answer)
        sides[side] = (total, count)
    margin = 2.0 * (sides["chosen"][0] / sides["chosen"][1] - sides["rejected"][0] / sides["rejected"][1]) - gamma
    nll = -sides["chosen"][0].sum() / sides["chosen"][1].sum()
    expected = (-(1 - eps) * F.logsigmoid(margin) - eps * F.logsigmoid(-margin)).mean() + alpha * nll
    expected.backward()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    grads64 = dict(model64.named_parameters())
    trained = [(name, p.grad) for name, p in model.named_parameters() if p.requires_grad]
    assert trained
    for name, grad in trained:
        reference = grads64[name].grad
        assert (grad.double() - reference).norm() <= 1e-4 * reference.norm() + 1e-9, name


def test_simpo_full_fine_tuning_builds_no_reference(demo_base, tmp_path):
    model, tokenizer = lora_model(demo_base, full_finetuning=True)
    options = {"loss_type": "simpo", "beta": 2.0}
    trainer = build("dpo", model, tokenizer, dataset("dpo", tokenizer, tmp_path), tmp_path, options)
    assert getattr(trainer, "ref_model", None) is None
    loss = trainer.compute_loss(model, dict(next(iter(trainer.get_train_dataloader()))))
    loss.backward()
    assert torch.isfinite(loss) and model.get_output_embeddings().weight.grad is not None
