"""Scripts in the shape of the well-known Unsloth notebooks, run unchanged but for the import (and small
shapes), against tiny local models: what they train, save and load is checked against transformers,
peft, gguf and string computations done here."""

import json
import math
import runpy
from pathlib import Path

import pytest
import torch

NOTEBOOKS = Path(__file__).parent / "notebooks"


def notebook_args(**overrides):
    """The training arguments every notebook sets (Unsloth's values, CPU-sized), with its own on top."""
    from ftengine.compat import is_bf16_supported

    return {"per_device_train_batch_size": 4, "gradient_accumulation_steps": 1, "learning_rate": 2e-3,
            "fp16": not is_bf16_supported(), "bf16": is_bf16_supported(), "use_cpu": not torch.cuda.is_available(),
            "logging_steps": 1, "optim": "adamw_torch", "weight_decay": 0.01, "lr_scheduler_type": "linear",
            "seed": 3407, "output_dir": "outputs", "report_to": "none", **overrides}


def run_notebook(name, monkeypatch, tmp_path, **names):
    """Run a notebook script in ``tmp_path``; ``names`` (the model and data paths) and :func:`notebook_args`
    are its given globals."""
    monkeypatch.chdir(tmp_path)
    given = {k: str(v) for k, v in names.items()}
    return runpy.run_path(str(NOTEBOOKS / f"{name}.py"), init_globals={**given, "notebook_args": notebook_args})


def trained_text(tokenizer, row):
    return tokenizer.decode([t for t, label in zip(row["input_ids"], row["labels"], strict=True) if label != -100])


def losses(trainer):
    return [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]


def decoder_layers(model):
    return [m for m in model.modules() if type(m).__name__.endswith("DecoderLayer")]


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


def test_llama31_conversational_notebook(tiny_llama, sharegpt_file, monkeypatch, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    ns = run_notebook("llama31_conversational", monkeypatch, tmp_path, MODEL_NAME=tiny_llama,
                      DATA_FILE=sharegpt_file)
    trainer, model, tokenizer = ns["trainer"], ns["model"], ns["tokenizer"]
    # The trainer ftengine builds: the loss from the model's fused forward, checkpointing left as
    # get_peft_model set it ("unsloth" = offload on every layer), not switched on again by trl.
    assert type(trainer).__name__ == "ModelLossSFTTrainer"
    assert trainer.args.gradient_checkpointing is False
    assert all(layer.gradient_checkpointing for layer in decoder_layers(model))
    # train_on_responses_only: exactly each assistant answer and its <|eot_id|> carry loss.
    rows = [json.loads(line)["conversations"] for line in sharegpt_file.read_text().splitlines()]
    assert len(trainer.train_dataset) == len(rows)
    for row, convo in zip(trainer.train_dataset, rows, strict=True):
        expected = "".join(t["value"] + "<|eot_id|>" for t in convo if t["from"] == "gpt")
        assert trained_text(tokenizer, row) == expected
    history = losses(trainer)
    assert len(history) == 8 and all(math.isfinite(x) for x in history) and history[-1] < history[0]
    assert "<|start_header_id|>assistant<|end_header_id|>" in ns["answer"][0]
    # The saved adapter, loaded by peft on the untouched base, gives the trained model's logits.
    base = AutoModelForCausalLM.from_pretrained(str(tiny_llama), dtype=torch.float32)
    reloaded = PeftModel.from_pretrained(base, str(tmp_path / "lora_model")).eval()
    ids = torch.tensor([tokenizer.encode("What is the capital of France?")])
    assert torch.allclose(logits(reloaded, ids), logits(model.eval(), ids), atol=1e-4)


def test_alpaca_notebook_saves_lora_and_merged(tiny_llama, alpaca_file, monkeypatch, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    ns = run_notebook("alpaca_sft", monkeypatch, tmp_path, MODEL_NAME=tiny_llama, DATA_FILE=alpaca_file)
    trainer, model, tokenizer = ns["trainer"], ns["model"], ns["tokenizer"]
    history = losses(trainer)
    assert len(history) == 4 and history[-1] < history[0]
    # Every text token is trained (trl's text-field behaviour), the first token aside.
    first = trainer.train_dataset[0]
    assert first["labels"][1:] == first["input_ids"][1:]
    assert trained_text(tokenizer, first).endswith("### Response:\n" + json.loads(
        alpaca_file.read_text().splitlines()[0])["output"] + tokenizer.eos_token)
    model.eval()
    ids = torch.tensor([tokenizer.encode("What is the capital of Italy?")])
    expected = logits(model, ids)
    base = AutoModelForCausalLM.from_pretrained(str(tiny_llama), dtype=torch.float32)
    adapter = PeftModel.from_pretrained(base, str(tmp_path / "lora_model")).eval()
    assert torch.allclose(logits(adapter, ids), expected, atol=1e-4)
    config = json.loads((tmp_path / "merged_model" / "config.json").read_text())
    assert config["dtype"] == "bfloat16" and "torch_dtype" not in config
    merged = AutoModelForCausalLM.from_pretrained(str(tmp_path / "merged_model"), dtype=torch.float32).eval()
    assert (logits(merged, ids) - expected).abs().max() < 0.05 * expected.abs().max()


def test_qwen25_sharegpt_notebook_and_gguf(tiny_llama, alpaca_file, monkeypatch, tmp_path):
    gguf = pytest.importorskip("gguf")
    ns = run_notebook("qwen25_sharegpt", monkeypatch, tmp_path, MODEL_NAME=tiny_llama, DATA_FILE=alpaca_file)
    trainer, tokenizer, dataset = ns["trainer"], ns["tokenizer"], ns["dataset"]
    # to_sharegpt stitched two rows per conversation; the mapped template read from/value turns.
    assert all(len(c) == 4 for c in dataset["conversations"])
    for row, convo in zip(trainer.train_dataset, dataset["conversations"], strict=True):
        expected = "".join(t["value"] + "<|im_end|>\n" for t in convo if t["from"] == "gpt")
        assert trained_text(tokenizer, row) == expected
    first = dataset["conversations"][0][0]["value"]
    source = json.loads(alpaca_file.read_text().splitlines()[0])
    assert first == source["instruction"] + (f"\nYour input is:\n{source['input']}" if source["input"] else "")
    files = sorted(p.name for p in ns["gguf_files"])
    assert files == ["Modelfile", "model-f16.gguf", "model-q8_0.gguf"]
    types = {gguf.GGUFReader(str(tmp_path / "model_gguf" / name)).fields["general.file_type"].parts[-1][0]
             for name in ("model-f16.gguf", "model-q8_0.gguf")}
    assert types == {int(gguf.LlamaFileType.MOSTLY_F16), int(gguf.LlamaFileType.MOSTLY_Q8_0)}


def test_dpo_notebook(tiny_llama, preference_file, monkeypatch, tmp_path):
    ns = run_notebook("dpo", monkeypatch, tmp_path, MODEL_NAME=tiny_llama, DATA_FILE=preference_file)
    trainer, model = ns["dpo_trainer"], ns["model"]
    assert trainer.args.beta == 0.1 and trainer.args.max_length == 128
    assert trainer.ref_model is None  # LoRA: the adapter disabled is the reference, no copy
    assert any("rewards/chosen" in entry for entry in trainer.state.log_history)
    lora_b = [p for n, p in model.named_parameters() if "lora_B" in n]
    assert lora_b and any(p.abs().max() > 0 for p in lora_b)  # trained from peft's zero init


def test_qwen25_vl_latex_ocr_notebook(tiny_qwen25_vl, latex_ocr_file, monkeypatch, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForImageTextToText

    from ftengine.engine import vision

    ns = run_notebook("qwen25_vl_latex_ocr", monkeypatch, tmp_path, MODEL_NAME=tiny_qwen25_vl,
                      DATA_FILE=latex_ocr_file)
    trainer, model, processor = ns["trainer"], ns["model"], ns["tokenizer"]
    assert ns["before"].shape[1] > ns["inputs"]["input_ids"].shape[1]  # the untrained model answered
    # Every text token trains, as Unsloth's collator: the image tokens (and the first token) are -100.
    row = ns["converted_dataset"][0]["messages"]
    text = processor.apply_chat_template(vision.for_template(row))
    expected = processor(text=[text], images=[row[0]["content"][1]["image"]], return_tensors="pt")["input_ids"][0]
    batch = trainer.data_collator([trainer.train_dataset[0]])
    assert torch.equal(batch["input_ids"][0], expected)
    image = expected == processor.image_token_id
    assert image.sum() > 0 and (batch["labels"][0][image] == -100).all()
    assert torch.equal(batch["labels"][0][1:][~image[1:]], expected[1:][~image[1:]])
    history = losses(trainer)
    assert len(history) == 3 and all(math.isfinite(x) for x in history) and history[-1] < history[0]
    # LoRA on both towers, trained from peft's zero B.
    trained = {n: p for n, p in model.named_parameters() if "lora_B" in n}
    assert any(".visual.blocks." in n and p.abs().max() > 0 for n, p in trained.items())
    assert any(".language_model." in n and p.abs().max() > 0 for n, p in trained.items())
    # The saved adapter and processor, loaded by peft / ftengine on the untouched base, give the trained logits.
    saved = vision.load_processor(str(tmp_path / "lora_model"), model.config)
    assert saved.chat_template == processor.chat_template
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    base = AutoModelForImageTextToText.from_pretrained(str(tiny_qwen25_vl), dtype=torch.float32)
    reloaded = PeftModel.from_pretrained(base, str(tmp_path / "lora_model")).eval()
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**inputs).logits, model(**inputs).logits, atol=1e-4, rtol=1e-4)
