"""Scripts in the shape of the well-known Unsloth notebooks, run unchanged but for the import (and small
shapes), against tiny local models: what they train, save and load is checked against transformers,
peft, gguf and string computations done here."""

import json
import math
import re
import runpy
from pathlib import Path

import pytest
import torch

from ftengine.core.errors import ConfigError

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


def test_qwen3_reasoning_notebook(tiny_qwen3, reasoning_file, sharegpt_file, monkeypatch, tmp_path, capsys):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    ns = run_notebook("qwen3_reasoning", monkeypatch, tmp_path, MODEL_NAME=tiny_qwen3, REASONING_FILE=reasoning_file,
                      CHAT_FILE=sharegpt_file)
    trainer, model, tokenizer = ns["trainer"], ns["model"], ns["tokenizer"]
    texts = ns["combined_dataset"]["text"]
    assert len(texts) == 12 + 4  # the reasoning rows and a quarter of chat rows
    first = json.loads(reasoning_file.read_text().splitlines()[0])
    answer = first["generated_solution"].split("</think>\n\n")[1]
    # Qwen3's template keeps the thinking block on the answer to the last question
    assert (f"<|im_start|>user\n{first['problem']}<|im_end|>\n<|im_start|>assistant\n<think>\nThe user asks: "
            f"{first['problem']}\n</think>\n\n{answer}<|im_end|>\n") in texts
    # every text trained whole, with the EOS appended as trl appends it to a text field not ending in it
    assert sorted(tokenizer.decode(row["input_ids"]) for row in trainer.train_dataset) == sorted(
        text + tokenizer.eos_token for text in texts)
    history = losses(trainer)
    assert len(history) == 4 and all(math.isfinite(x) for x in history) and history[-1] < history[0]
    # thinking switched off: the prompt ends with an empty think block; the streamed answer follows it
    assert ns["text"].endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    assert capsys.readouterr().out.strip()
    base = AutoModelForCausalLM.from_pretrained(str(tiny_qwen3), dtype=torch.float32)
    reloaded = PeftModel.from_pretrained(base, str(tmp_path / "lora_model")).eval()
    ids = torch.tensor([tokenizer.encode(ns["text"])])
    torch.testing.assert_close(logits(reloaded, ids), logits(model.eval(), ids), atol=1e-4, rtol=1e-4)


def test_gemma3_notebook(tiny_gemma3, sharegpt_file, monkeypatch, tmp_path):
    from gguf import GGUFReader
    from transformers import AutoModelForCausalLM

    ns = run_notebook("gemma3_conversational", monkeypatch, tmp_path, MODEL_NAME=tiny_gemma3, DATA_FILE=sharegpt_file)
    trainer, model, tokenizer = ns["trainer"], ns["model"], ns["tokenizer"]
    rows = [json.loads(line)["conversations"] for line in sharegpt_file.read_text().splitlines()]
    assert len(trainer.train_dataset) == len(rows)
    for row, convo in zip(trainer.train_dataset, rows, strict=True):
        # one <bos>: the template's was removed from the text, the tokenizer put its own
        assert row["input_ids"][0] == tokenizer.bos_token_id and tokenizer.bos_token_id not in row["input_ids"][1:]
        # each answer through the next user turn, and the EOS trl appends to a text not ending in it
        expected = "".join(t["value"].strip() + "<end_of_turn>\n" for t in convo if t["from"] == "gpt")
        assert trained_text(tokenizer, row) == expected + tokenizer.eos_token
    history = losses(trainer)
    assert len(history) == 4 and all(math.isfinite(x) for x in history) and history[-1] < history[0]
    prompt = "<start_of_turn>user\nContinue the sequence: 1, 1, 2, 3, 5, 8,<end_of_turn>\n<start_of_turn>model\n"
    assert prompt in ns["answer"][0] and not ns["answer"][0].endswith(prompt)
    # the merged model (16-bit: each adapted weight is W + scaling * B @ A, computed in float64 here, in
    # bfloat16) and the GGUF (written with the tokenizer the model was loaded with, whose template the
    # notebook set) beside it
    merged = AutoModelForCausalLM.from_pretrained(str(tmp_path / "gemma-3-finetune"), dtype=torch.float32)
    weights = merged.state_dict()
    adapted = [(name, m) for name, m in model.named_modules() if hasattr(m, "lora_A") and "default" in m.lora_A]
    assert len(adapted) == 2 * 7
    for name, module in adapted:
        delta = module.lora_B["default"].weight.double() @ module.lora_A["default"].weight.double()
        expected = (module.base_layer.weight.double() + module.scaling["default"] * delta).to(torch.bfloat16)
        torch.testing.assert_close(weights[name.removeprefix("base_model.model.") + ".weight"], expected.float(),
                                   rtol=2 ** -8, atol=0)
    [gguf_file] = (tmp_path / "gemma-3-finetune").glob("*.gguf")
    reader = GGUFReader(str(gguf_file))
    field = reader.fields["tokenizer.chat_template"]
    assert bytes(field.parts[field.data[0]]).decode() == tokenizer.chat_template
    assert {t.tensor_type.name for t in reader.tensors if t.name.endswith("attn_q.weight")} == {"Q8_0"}


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
        assert trained_text(tokenizer, row) == expected + tokenizer.eos_token  # as trl appends it to the text
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


def test_grpo_notebook(tiny_llama, arithmetic_file, monkeypatch, tmp_path):
    from trl.trainer.grpo_trainer import GRPOTrainer

    ns = run_notebook("grpo", monkeypatch, tmp_path, MODEL_NAME=tiny_llama, DATA_FILE=arithmetic_file)
    trainer, config, seen = ns["trainer"], ns["training_args"], ns["seen"]
    # trl's own GRPOTrainer class, built by ftengine's grpo trainer with the notebook's GRPOConfig values
    assert type(trainer) is GRPOTrainer
    assert (trainer.args.num_generations, trainer.args.max_completion_length, trainer.args.beta) == (4, 8, 0.04)
    assert trainer.args.loss_type == config.loss_type and trainer.args.learning_rate == 5e-4
    # The notebook's reward functions (trl's convention: completion[0]["content"], prompts as messages) were
    # handed each step's group of 4 sampled answers with the row's own answer column.
    assert len(seen) == 2
    for call in seen:
        a, op, b = re.fullmatch(r"What is (\d+) ([+-]) (\d+)\?", call["question"]).groups()
        expected = str(int(a) + int(b) if op == "+" else int(a) - int(b))
        assert call["answer"] == [expected] * 4
        assert len(call["responses"]) == 4 and all(isinstance(r, str) and r for r in call["responses"])
    logged = [entry for entry in trainer.state.log_history if "reward" in entry]
    assert len(logged) == 2
    for entry, call in zip(logged, seen, strict=True):
        scores = ns["xmlcount_reward_func"]([[{"role": "assistant", "content": r}] for r in call["responses"]])
        assert entry["rewards/xmlcount_reward_func/mean"] == pytest.approx(sum(scores) / 4)
        assert "rewards/correctness_reward_func/mean" in entry and "kl" in entry
    check_fast_generate(ns, tiny_llama, tmp_path)


def greedy_reference(model, tokenizer, text, max_new_tokens):
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=max_new_tokens,
                             pad_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id)
    new = out[0, ids.shape[1]:].tolist()
    return new[:new.index(tokenizer.eos_token_id)] if tokenizer.eos_token_id in new else new


def check_fast_generate(ns, base_dir, tmp_path):
    """The notebook's ending: the saved adapter is the trained one, and ``fast_generate`` answers as unpatched
    transformers does with the base model (no lora_request) and with the saved adapter (peft on the base)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from ftengine.compat import SamplingParams

    model, tokenizer, text = ns["model"], ns["tokenizer"], ns["text"]
    assert isinstance(ns["output"], str)
    saved = tmp_path / "grpo_saved_lora"
    assert (saved / "adapter_config.json").is_file() and not (saved / "tokenizer_config.json").exists()
    # two CPU steps barely move the adapter: a larger one, so the base and the adapter answer differently
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.2, generator=torch.Generator().manual_seed(0))
    model.save_lora(str(saved))
    base = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32).eval()
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids
    model.eval()
    torch.testing.assert_close(logits(PeftModel.from_pretrained(base, str(saved)), ids), logits(model, ids),
                               atol=1e-4, rtol=1e-4)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    greedy = SamplingParams(temperature=0, max_tokens=12)
    [untrained] = model.fast_generate([text], sampling_params=greedy, lora_request=None)
    [trained] = model.fast_generate(text, sampling_params=greedy, lora_request=model.load_lora(str(saved)))
    base = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32).eval()
    assert untrained.outputs[0].token_ids != trained.outputs[0].token_ids
    assert untrained.outputs[0].token_ids == greedy_reference(base, tokenizer, text, 12)
    with_adapter = PeftModel.from_pretrained(base, str(saved)).eval()
    assert trained.outputs[0].token_ids == greedy_reference(with_adapter, tokenizer, text, 12)
    assert trained.outputs[0].text == tokenizer.decode(trained.outputs[0].token_ids, skip_special_tokens=True)
    # the loaded adapter is gone afterwards: the trained one is active and trains as before
    assert list(model.peft_config) == ["default"] and model.active_adapter == "default"
    assert {n for n, p in model.named_parameters() if p.requires_grad} == trainable
    # n completions per prompt, cut before a stop string as vLLM cuts them
    answer = trained.outputs[0].text
    stop = answer[len(answer) // 2:][:3]
    [cut] = model.fast_generate(text, sampling_params={"temperature": 0, "max_tokens": 12, "n": 3, "stop": [stop]},
                                lora_request=model.load_lora(str(saved)))
    assert [o.index for o in cut.outputs] == [0, 1, 2]
    assert all(o.text == answer[:answer.index(stop)] and o.finish_reason == "stop" for o in cut.outputs)


def test_a_grpo_reward_function_that_raises_names_itself_and_the_row(tiny_llama, arithmetic_file, tmp_path):
    from datasets import load_dataset
    from trl import GRPOConfig
    from trl import GRPOTrainer

    from ftengine.compat import FastLanguageModel
    from ftengine.compat.chat_templates import get_chat_template
    from ftengine.core.errors import DataError

    model, tokenizer = FastLanguageModel.from_pretrained(model_name=str(tiny_llama), max_seq_length=128,
                                                         load_in_4bit=False)
    model = FastLanguageModel.get_peft_model(model, r=4, use_gradient_checkpointing=False)
    tokenizer = get_chat_template(tokenizer, chat_template="chatml")
    data = load_dataset("json", data_files=str(arithmetic_file), split="train")
    data = data.map(lambda x: {"prompt": [{"role": "user", "content": x["question"]}]})

    def picky(completions, answer, **kwargs):
        return [float(c[0]["content"] == a) / 0 for c, a in zip(completions, answer, strict=True)]

    args = GRPOConfig(**notebook_args(num_generations=4, max_completion_length=4, max_steps=1,
                                      output_dir=str(tmp_path / "out")))
    trainer = GRPOTrainer(model=model, processing_class=tokenizer, reward_funcs=picky, args=args, train_dataset=data)
    with pytest.raises(DataError, match=r"reward function 'picky' failed on data: row \d+ .*ZeroDivisionError"):
        trainer.train()
    with pytest.raises(ConfigError, match="use_vllm=True"):
        vllm = GRPOConfig(**notebook_args(use_vllm=True, num_generations=4, output_dir=str(tmp_path / "out")))
        GRPOTrainer(model=model, processing_class=tokenizer, reward_funcs=picky, train_dataset=data, args=vllm)


def test_kto_notebook(tiny_llama, kto_file, monkeypatch, tmp_path):
    from trl.trainer.kto_trainer import KTOTrainer

    ns = run_notebook("kto", monkeypatch, tmp_path, MODEL_NAME=tiny_llama, DATA_FILE=kto_file)
    trainer, model = ns["kto_trainer"], ns["model"]
    assert type(trainer) is KTOTrainer and trainer.ref_model is None  # the adapter disabled is the reference
    assert (trainer.args.beta, trainer.args.desirable_weight, trainer.args.undesirable_weight) == (0.2, 1.0, 1.5)
    history = losses(trainer)
    assert len(history) == 3 and all(math.isfinite(x) for x in history)
    lora_b = [p for n, p in model.named_parameters() if "lora_B" in n]
    assert lora_b and any(p.abs().max() > 0 for p in lora_b)  # trained from peft's zero init


def test_orpo_notebook(tiny_llama, preference_file, monkeypatch, tmp_path):
    from trl.experimental.orpo import ORPOTrainer

    ns = run_notebook("orpo", monkeypatch, tmp_path, MODEL_NAME=tiny_llama, DATA_FILE=preference_file)
    trainer, model = ns["orpo_trainer"], ns["model"]
    assert isinstance(trainer, ORPOTrainer) and trainer.args.beta == 0.1 and trainer.args.max_length == 128
    history = losses(trainer)
    assert len(history) == 3 and all(math.isfinite(x) for x in history)
    assert any("log_odds_ratio" in entry for entry in trainer.state.log_history)
    lora_b = [p for n, p in model.named_parameters() if "lora_B" in n]
    assert lora_b and any(p.abs().max() > 0 for p in lora_b)  # trained from peft's zero init
