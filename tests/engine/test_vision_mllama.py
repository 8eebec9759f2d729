"""Llama 3.2 Vision through the vision data path and a run: the processor's cross-attention inputs in the
batch, one image per turn, QLoRA's 16-bit vision side, and a short run whose merged export reloads in
transformers (AutoModelForImageTextToText) with the trained model's logits."""

from __future__ import annotations

import json

import pytest
import torch

from ftengine.core.config import validate_config
from ftengine.core.errors import DataError
from ftengine.engine import pipeline
from ftengine.engine import run_data
from ftengine.engine import vision
from ftengine.engine.data import IGNORE


def conversation(image, answer="x^2"):
    return [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": "Read:"}]},
            {"role": "assistant", "content": answer}]


def run_config(base, data, tmp_path, **overrides):
    return validate_config({
        "model": {"name_or_path": str(base), "max_seq_length": 64, "dtype": "float32"},
        "lora": {"r": 8, "lora_alpha": 16},
        "data": {"path": str(data), "format": "vision", "instruction": "Write the LaTeX.", "max_rows": 6},
        "training": {"max_steps": 2, "per_device_train_batch_size": 3, "gradient_accumulation_steps": 1,
                     "learning_rate": 3e-3, "logging_steps": 1, "save_steps": 100, "gradient_checkpointing": False,
                     "seed": 7},
        "export": [{"format": "merged", "dtype": "float16"}],
        "output": {"dir": str(tmp_path / "runs"), "name": "mllama"},
        **overrides,
    })


def test_collator_gives_cross_attention_inputs_and_trains_only_the_answer(mllama_base, formula_images):
    from transformers import AutoConfig

    processor = vision.load_processor(str(mllama_base), AutoConfig.from_pretrained(str(mllama_base)))
    wide = vision.open_image(formula_images / "images" / "0.png")  # two tiles side by side
    text_only = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "a+b"}]
    batch = vision.encode_batch(processor, [conversation(wide), conversation(wide.resize((20, 20)), "y"), text_only])
    assert batch["pixel_values"].shape == (3, 1, 2, 3, 28, 28)  # (B, images, tiles, C, H, W)
    assert batch["aspect_ratio_ids"].tolist() == [[2], [1], [0]]  # [1, 2] tiles, [1, 1], no image
    assert batch["aspect_ratio_mask"][:2, 0].tolist() == [[1, 1], [1, 0]]
    image_id = processor.image_token_id
    assert (batch["input_ids"] == image_id).sum(dim=1).tolist() == [1, 1, 0]  # one token per image
    cross = batch["cross_attention_mask"]  # (B, T, images, tiles)
    first = int((batch["input_ids"][0] == image_id).nonzero())
    assert not cross[0, :first].any() and cross[0, first:, 0].all() and not cross[2].any()
    tokenizer = processor.tokenizer
    for row, answer in enumerate(("x^2", "y", "a+b")):
        trained = batch["labels"][row][batch["labels"][row] != IGNORE]
        assert tokenizer.decode(trained) == answer + "<|eot_id|>"


def test_more_images_in_a_turn_than_the_model_takes_is_a_row_error(mllama_base, formula_images, tmp_path):
    image = str(formula_images / "images" / "0.png")
    two = {"role": "user", "content": [{"type": "image", "image": image}, {"type": "image", "image": image}]}
    rows = [{"messages": conversation(image)}, {"messages": [two, {"role": "assistant", "content": "a"}]}]
    path = tmp_path / "chat.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    config = run_config(mllama_base, path, tmp_path)
    config.data.format = "messages"
    loaded = pipeline.load(config)
    with pytest.raises(DataError, match=r"chat.jsonl: row 2: message 1 \(user\) holds 2 images; this model takes "
                                        r"at most 1 per turn"):
        run_data.data(loaded, config)


def test_qlora_keeps_the_vision_model_and_projector_16bit(mllama_base, formula_images, tmp_path):
    pytest.importorskip("bitsandbytes")
    config = run_config(mllama_base, formula_images / "data.jsonl", tmp_path,
                        quantization={"load_in_4bit": True, "bnb_4bit_compute_dtype": "float32"})
    modules = dict(pipeline.load(config).model.named_modules())
    assert type(modules["model.language_model.layers.1.cross_attn.q_proj"]).__name__ == "Linear4bit"
    assert type(modules["model.vision_model.transformer.layers.0.self_attn.q_proj"]) is torch.nn.Linear
    assert type(modules["model.multi_modal_projector"]) is torch.nn.Linear


def test_run_trains_and_merged_export_reloads(mllama_base, formula_images, tmp_path, one_thread):
    from transformers import AutoModelForImageTextToText

    result = pipeline.run(run_config(mllama_base, formula_images / "data.jsonl", tmp_path))
    assert result.train.steps == 2 and result.data.images == 6 and result.data.image_tokens == 6
    trained = {n for n, p in result.model.named_parameters() if p.requires_grad}
    assert any(".vision_model." in n for n in trained) and any(".cross_attn." in n for n in trained)
    processor = result.tokenizer
    rows = [vision.with_images_opened(conversation(str(formula_images / "images" / f"{i}.png")), None) for i in (0, 5)]
    inputs = {k: v for k, v in vision.encode_batch(processor, rows).items() if k != "labels"}
    model = result.model
    model.eval()
    with torch.no_grad():
        expected = model(**inputs).logits
        merged = AutoModelForImageTextToText.from_pretrained(str(result.exports["merged"][0]), dtype=torch.float32)
        assert type(merged).__name__ == "MllamaForConditionalGeneration"
        from_merged = merged(**inputs).logits
        base = AutoModelForImageTextToText.from_pretrained(str(mllama_base), dtype=torch.float32)
        untrained = base(**inputs).logits
    torch.testing.assert_close(from_merged, expected, atol=2e-2, rtol=0)  # float16 weights
    assert (untrained - expected).abs().max() > 0.1, "training must have moved the logits for the check to mean much"
