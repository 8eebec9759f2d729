"""A patched model under trl's SFTTrainer: the same per-step losses and trained adapters as the unpatched model.

trl (1.16) wraps the model's forward with its own fused LM head (``fused_lm_head=True``: per-token
log-probabilities, entropy and accuracy without logits), which runs the patched decoder body; the
adapter's own fused loss serves every other caller (plain ``Trainer``, custom loops)."""

from __future__ import annotations

import copy

import pytest
import torch
from peft import LoraConfig
from peft import get_peft_model
from transformers import LlamaForCausalLM
from transformers import PreTrainedTokenizerFast

from ftengine.core.kernels import get_op

from .helpers import adapter
from .helpers import use_backend
from .test_llama import VOCAB
from .test_llama import config

Dataset = pytest.importorskip("datasets").Dataset  # a training dependency; GPU hosts may run the kernels without it


def _collate(rows: list[dict]) -> dict[str, torch.Tensor]:
    ids = torch.tensor([row["input_ids"] for row in rows])
    labels = ids.clone()
    labels[:, :2] = -100
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}


def _train(model, tmp_path, tokenizer) -> list[float]:
    from trl import SFTConfig
    from trl import SFTTrainer

    g = torch.Generator().manual_seed(0)
    rows = Dataset.from_dict({"input_ids": torch.randint(0, VOCAB, (8, 10), generator=g).tolist()})
    args = SFTConfig(output_dir=str(tmp_path), max_steps=3, per_device_train_batch_size=4, learning_rate=5e-3,
                     logging_steps=1, report_to=[], save_strategy="no", use_cpu=True, bf16=False,
                     activation_checkpointing=False, dataset_kwargs={"skip_prepare_dataset": True},
                     remove_unused_columns=False, seed=0, data_seed=0)
    trainer = SFTTrainer(model=model, args=args, train_dataset=rows, processing_class=tokenizer,
                         data_collator=_collate)
    trainer.train()
    return [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]


def test_sft_losses_match_unpatched(tmp_path, monkeypatch):
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel

    tokenizer = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(WordLevel({f"t{i}": i for i in range(VOCAB)},
                                                                             unk_token="t0")),
                                        pad_token="t0", eos_token="t1")
    use_backend(monkeypatch, "reference")  # the kernels have their own tests; this one is about trl
    torch.manual_seed(0)
    base = LlamaForCausalLM(config())
    patched = copy.deepcopy(base)
    adapter("llama").patch(patched, get_op)
    lora = LoraConfig(r=4, lora_alpha=8, init_lora_weights=False, target_modules="all-linear")
    torch.manual_seed(1)
    reference = get_peft_model(base, lora)
    patched = get_peft_model(patched, copy.deepcopy(lora))
    patched.load_state_dict(reference.state_dict())
    losses_ref = _train(reference, tmp_path / "ref", tokenizer)
    losses_pat = _train(patched, tmp_path / "pat", tokenizer)
    assert len(losses_ref) == 3
    assert losses_ref[-1] < losses_ref[0]
    torch.testing.assert_close(torch.tensor(losses_pat), torch.tensor(losses_ref), rtol=1e-4, atol=0)
    trained = dict(patched.named_parameters())
    for name, param in reference.named_parameters():
        if param.requires_grad:  # the adapters after three AdamW steps
            torch.testing.assert_close(trained[name], param, rtol=1e-4, atol=1e-6, msg=name)
