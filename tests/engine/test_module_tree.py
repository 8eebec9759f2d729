"""The module tree walked once a run: the cached walks answer as torch's own, training gives the same weights
with the cache as without it, and the cache never outlives ``trainer.train()``."""

import copy
from types import SimpleNamespace

import pytest
import torch
from transformers import TrainerCallback

import ftengine
from ftengine.demo import ASSETS
from ftengine.engine import module_tree
from ftengine.engine.module_tree import cache_walks
from ftengine.engine.module_tree import uncache_walks
from ftengine.engine.module_tree import walks_cacheable


class FrozenNorm(torch.nn.Module):
    """A module whose own ``train()`` keeps its batch norm in eval mode, as fine-tuning code often does."""

    def __init__(self):
        super().__init__()
        self.linear = torch.nn.Linear(4, 4)
        self.norm = torch.nn.BatchNorm1d(4)

    def train(self, mode=True):
        super().train(mode)
        self.norm.eval()
        return self


def lora_model(demo_base):
    model, tokenizer = ftengine.load_model(str(demo_base), dtype="float32", load_in_4bit=False)
    return ftengine.add_lora(model, r=4, lora_alpha=8, use_gradient_checkpointing=False), tokenizer


def test_cached_walks_answer_as_torch_walks(demo_base):
    model, _ = lora_model(demo_base)
    walked = list(model.parameters())
    cache_walks(model)
    try:
        assert [id(p) for p in model.parameters()] == [id(p) for p in walked]
        assert list(model.parameters(recurse=False)) == list(torch.nn.Module.parameters(model, recurse=False))
        for p in walked:
            p.grad = torch.ones_like(p) if p.requires_grad else None
        model.zero_grad()
        assert all(p.grad is None for p in walked)
        assert model.eval() is model and not any(m.training for m in model.modules())
        assert model.train() is model and all(m.training for m in model.modules())
        with pytest.raises(ValueError, match="boolean"):
            model.train("yes")
    finally:
        uncache_walks(model)
    assert "train" not in model.__dict__ and "parameters" not in model.__dict__


def test_a_copy_made_while_cached_walks_its_own_tree():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 2))
    cache_walks(model)
    copied = copy.deepcopy(model)
    uncache_walks(model)
    assert [id(p) for p in copied.parameters()] == [id(p) for p in torch.nn.Module.parameters(copied)]
    assert not {id(p) for p in copied.parameters()} & {id(p) for p in model.parameters()}
    copied.eval()
    assert not any(m.training for m in copied.modules()) and all(m.training for m in model.modules())


def test_a_change_of_mode_reaches_modules_with_a_train_of_their_own():
    model = torch.nn.Sequential(FrozenNorm(), torch.nn.Linear(4, 4))
    model.eval()
    cache_walks(model)
    model.train()
    assert model[1].training and model[0].linear.training and not model[0].norm.training
    model.train()  # the frozen norm differs from the mode: the walk runs again, and keeps it frozen
    assert not model[0].norm.training
    model.eval()
    assert not any(m.training for m in model.modules())


def test_only_one_process_on_one_device_is_cached():
    model = torch.nn.Linear(2, 2)
    assert walks_cacheable(model, SimpleNamespace(world_size=1, n_gpu=1))
    assert not walks_cacheable(model, SimpleNamespace(world_size=2, n_gpu=1))  # DDP / FSDP wrap or reshard it
    assert not walks_cacheable(model, SimpleNamespace(world_size=1, n_gpu=2))  # DataParallel
    assert not walks_cacheable(FrozenNorm(), SimpleNamespace(world_size=1, n_gpu=1))  # a train() of its own


def trained_lora(demo_base, tmp_path, name, callbacks=()):
    torch.manual_seed(0)
    model, tokenizer = lora_model(demo_base)
    dataset = ftengine.load_dataset(str(ASSETS / "data.jsonl"), tokenizer, max_seq_length=64, max_rows=16)
    trainer = ftengine.make_trainer(model, tokenizer, dataset, max_steps=3, per_device_train_batch_size=4,
                                    gradient_accumulation_steps=1, output_dir=str(tmp_path / name), save_steps=100,
                                    seed=0, callbacks=list(callbacks))
    trainer.train()
    return model, {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}


def test_training_with_the_cache_gives_the_weights_of_training_without_it(demo_base, tmp_path, monkeypatch):
    cached_during = []

    class Watch(TrainerCallback):
        def on_step_begin(self, args, state, control, model=None, **kwargs):
            cached_during.append("parameters" in model.__dict__)

    model, cached = trained_lora(demo_base, tmp_path, "cached", [Watch()])
    assert cached_during == [True] * 3
    assert "parameters" not in model.__dict__ and "train" not in model.__dict__  # released at the end
    monkeypatch.setattr(module_tree, "walks_cacheable", lambda model, args: False)
    _, walked = trained_lora(demo_base, tmp_path, "walked")
    # zero_grad through the cache cleared every gradient: otherwise they would add up over the steps
    assert cached.keys() == walked.keys() and all(torch.equal(cached[n], walked[n]) for n in cached)


def test_the_cache_is_released_when_training_raises(demo_base, tmp_path):
    class Fail(TrainerCallback):
        def on_step_end(self, args, state, control, model=None, **kwargs):
            assert "parameters" in model.__dict__
            raise RuntimeError("a callback failed")

    model, tokenizer = lora_model(demo_base)
    dataset = ftengine.load_dataset(str(ASSETS / "data.jsonl"), tokenizer, max_seq_length=64, max_rows=8)
    trainer = ftengine.make_trainer(model, tokenizer, dataset, max_steps=2, per_device_train_batch_size=4,
                                    gradient_accumulation_steps=1, output_dir=str(tmp_path / "run"), save_steps=100,
                                    callbacks=[Fail()])
    with pytest.raises(RuntimeError, match="a callback failed"):
        trainer.train()
    assert "parameters" not in model.__dict__ and "train" not in model.__dict__
