"""The vision data path and a vision-language run on the demo's tiny Qwen2.5-VL: image tokens and labels
from the collator, image sources (paths, Parquet bytes), the vision format, bad rows, QLoRA's 16-bit
vision tower, and a short run whose exports reload in transformers / peft with the trained model's logits."""

from __future__ import annotations

import json
import os

import pytest
import torch

from ftengine.core.config import validate_config
from ftengine.core.errors import DataError
from ftengine.core.types import Sample
from ftengine.engine import pipeline
from ftengine.engine import run_data
from ftengine.engine import vision
from ftengine.engine.data import IGNORE
from ftengine.engine.data import DataReport
from ftengine.engine.data import encode_sample
from ftengine.engine.data import load_samples


@pytest.fixture(scope="session")
def vision_base(tmp_path_factory):
    os.environ.setdefault("FTENGINE_CACHE", str(tmp_path_factory.mktemp("ftengine-cache")))
    from ftengine.demo.vision import base_model_dir

    return base_model_dir()


@pytest.fixture(scope="session")
def formulas(vision_base):
    from ftengine.demo.vision import data_dir

    return data_dir()


@pytest.fixture(scope="session")
def processor(vision_base):
    from transformers import AutoConfig

    return vision.load_processor(str(vision_base), AutoConfig.from_pretrained(str(vision_base)))


def conversation(image, answer="x^2"):
    return [{"role": "user", "content": [{"type": "text", "text": "Read:"}, {"type": "image", "image": image}]},
            {"role": "assistant", "content": answer}]


def test_collator_expands_images_and_trains_only_the_answer(processor, formulas):
    wide = vision.open_image(formulas / "images" / "0.png")
    small = wide.resize((28, 28))
    batch = vision.encode_batch(processor, [conversation(wide, "x^2"), conversation(small, r"\frac{a}{b}")])
    merge = processor.image_processor.merge_size ** 2
    expected_tokens = (batch["image_grid_thw"].prod(dim=1) // merge).tolist()
    image_id = processor.image_token_id
    assert (batch["input_ids"] == image_id).sum(dim=1).tolist() == expected_tokens
    assert expected_tokens[0] > expected_tokens[1] == 1
    tokenizer = processor.tokenizer
    for row, answer in enumerate(("x^2", r"\frac{a}{b}")):
        trained = batch["labels"][row][batch["labels"][row] != IGNORE]
        # the text path's trained tokens for the same conversation without its image
        text_only = encode_sample(Sample(messages=[{"role": "user", "content": "Read:"},
                                                   {"role": "assistant", "content": answer}]), tokenizer, "assistant")
        assert trained.tolist() == [t for t, on in zip(text_only.input_ids, text_only.trained, strict=True) if on]
        assert tokenizer.decode(trained).startswith(answer + tokenizer.eos_token)
        kept = batch["attention_mask"][row].bool()
        assert torch.equal(batch["input_ids"][row][kept][-len(trained):], trained)  # the answer ends the row
    assert (batch["labels"][batch["input_ids"] == image_id] == IGNORE).all()
    assert (batch["labels"][batch["attention_mask"] == 0] == IGNORE).all()


def test_max_pixels_lowers_the_image_token_count(vision_base, formulas):
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(str(vision_base))
    image = vision.open_image(formulas / "images" / "4.png")
    counts = []
    for max_pixels in (28 * 28 * 12, 28 * 28 * 4):
        proc = vision.load_processor(str(vision_base), config, max_pixels=max_pixels, min_pixels=28 * 28)
        batch = vision.encode_batch(proc, [conversation(image)])
        counts.append(int((batch["input_ids"] == proc.image_token_id).sum()))
        assert int(batch["image_grid_thw"].prod()) <= max_pixels // (14 * 14)
    assert counts[1] < counts[0], counts


def data_config(path, **data):
    return validate_config({"model": {"name_or_path": "x"}, "data": {"path": str(path), **data}}).data


def test_vision_format_with_instruction_and_columns(tmp_path, formulas):
    rows = [{"picture": str(formulas / "images" / "0.png"), "latex": "x^2"}]
    path = tmp_path / "ocr.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    report = DataReport()
    samples = load_samples(str(path), data_config(path, columns={"picture": "image", "latex": "text"},
                                                  instruction="Write the LaTeX."), report)
    assert report.format == "vision"
    (_, sample), = samples
    assert sample.messages == [{"role": "user", "content": [{"type": "text", "text": "Write the LaTeX."},
                                                           {"type": "image", "image": rows[0]["picture"]}]},
                               {"role": "assistant", "content": "x^2"}]


def test_messages_with_relative_image_paths_and_parquet_bytes(tmp_path, processor, formulas):
    import datasets

    png = (formulas / "images" / "1.png").read_bytes()
    (tmp_path / "imgs").mkdir()
    (tmp_path / "imgs" / "a.png").write_bytes(png)
    jsonl = tmp_path / "chat.jsonl"
    jsonl.write_text(json.dumps({"messages": conversation("imgs/a.png", "y^3")}) + "\n")
    table = datasets.Dataset.from_dict({"image": [{"bytes": png, "path": None}], "text": ["y^3"]},
                                       features=datasets.Features({"image": datasets.Image(),
                                                                   "text": datasets.Value("string")}))
    parquet = tmp_path / "ocr.parquet"
    table.to_parquet(str(parquet))
    encoded = []
    for path in (jsonl, parquet):
        report = DataReport()
        samples = load_samples(str(path), data_config(path), report)
        rows = vision.vision_rows(samples, processor, 256, "assistant", "error", report)
        assert report.images == 1 and report.image_tokens > 0
        encoded.append(vision.encode_batch(processor, [rows[0]["messages"]]))
    assert torch.equal(encoded[0]["pixel_values"], encoded[1]["pixel_values"])


def test_bad_image_rows_name_the_row(tmp_path, processor, formulas):
    (tmp_path / "broken.png").write_text("not an image")
    rows = [{"image": str(formulas / "images" / "0.png"), "text": "x^2"},
            {"image": "missing.png", "text": "y"},
            {"image": "broken.png", "text": "z"}]
    path = tmp_path / "ocr.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    samples = load_samples(str(path), data_config(path), DataReport())
    with pytest.raises(DataError, match=r"ocr.jsonl: row 2: image file .*missing.png' does not exist"):
        vision.vision_rows(samples, processor, 256, "assistant", "error", DataReport())
    report = DataReport()
    kept = vision.vision_rows(samples, processor, 256, "assistant", "skip", report)
    assert len(kept) == 1 and report.skipped == 2
    assert "row 3: unreadable image" in report.skip_reasons[1]
    with pytest.raises(DataError, match="more than model.max_seq_length 8"):
        vision.vision_rows(samples[:1], processor, 8, "assistant", "error", DataReport())
    with pytest.raises(DataError, match=r"row 1: has an image part, but the model has no vision tower"):
        vision.reject_images(samples)


def test_bad_content_parts_are_row_errors(tmp_path):
    path = tmp_path / "chat.jsonl"
    path.write_text(json.dumps({"messages": [{"role": "user", "content": [{"type": "image"}]},
                                             {"role": "assistant", "content": "a"}]}) + "\n")
    with pytest.raises(DataError, match=r"row 1: field 'messages\[0\].content\[0\].image'"):
        load_samples(str(path), data_config(path), DataReport())


def run_config(base, data, tmp_path, **overrides):
    raw = {
        "model": {"name_or_path": str(base), "max_seq_length": 128, "dtype": "float32"},
        "lora": {"r": 8, "lora_alpha": 16, **overrides.pop("lora", {})},
        "data": {"path": str(data), "format": "vision", "instruction": "Write the LaTeX.", "max_rows": 8},
        "training": {"max_steps": 3, "per_device_train_batch_size": 4, "gradient_accumulation_steps": 1,
                     "learning_rate": 3e-3, "logging_steps": 1, "save_steps": 100, "gradient_checkpointing": False,
                     "seed": 7},
        "export": [{"format": "lora"}, {"format": "merged", "dtype": "float16"}],
        "output": {"dir": str(tmp_path / "runs"), "name": "vision"},
        **overrides,
    }
    return validate_config(raw)


def test_run_trains_both_towers_and_exports_reload(vision_base, formulas, tmp_path, one_thread):
    from peft import PeftModel
    from transformers import AutoModelForImageTextToText

    result = pipeline.run(run_config(vision_base, formulas / "data.jsonl", tmp_path))
    assert result.train.steps == 3 and result.data.images == 8
    model = result.model
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    assert any(".visual.blocks." in n for n in trained) and any(".language_model." in n for n in trained)
    assert not any(".merger." in n for n in trained)
    processor = result.tokenizer
    rows = [vision.with_images_opened(conversation(str(formulas / "images" / f"{i}.png")), None) for i in (0, 5)]
    batch = vision.encode_batch(processor, rows)
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    model.eval()
    with torch.no_grad():
        expected = model(**inputs).logits
        merged = AutoModelForImageTextToText.from_pretrained(str(result.exports["merged"][0]), dtype=torch.float32)
        base = AutoModelForImageTextToText.from_pretrained(str(vision_base), dtype=torch.float32)
        adapter = PeftModel.from_pretrained(base, str(result.exports["lora"][0]))
        from_adapter = adapter(**inputs).logits
        from_merged = merged(**inputs).logits
    torch.testing.assert_close(from_adapter, expected, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(from_merged, expected, atol=2e-2, rtol=0)  # float16 weights
    reloaded = vision.load_processor(str(result.exports["merged"][0]), merged.config)
    assert reloaded.chat_template == processor.chat_template
    answer = vision.generate_with_images(merged, reloaded, conversation(str(formulas / "images" / "0.png"))[:1],
                                         max_new_tokens=4)
    assert isinstance(answer, str)
    import ftengine

    image_question = conversation(str(formulas / "images" / "0.png"))[:1]
    assert ftengine.generate(merged, reloaded, image_question, max_new_tokens=4, temperature=0) == answer


def test_switches_pick_the_language_tower_only(vision_base, formulas, tmp_path):
    config = run_config(vision_base, formulas / "data.jsonl", tmp_path,
                        lora={"finetune_vision_layers": False, "finetune_mlp_modules": False})
    loaded = pipeline.adapt(pipeline.load(config), config.lora, gradient_checkpointing=False)
    trained = [n for n, p in loaded.model.named_parameters() if p.requires_grad]
    assert trained and all(".language_model." in n and ".self_attn." in n for n in trained)
    assert any("the attention projections of the language tower" in note for note in loaded.notes)


def test_qlora_keeps_the_vision_tower_16bit(vision_base, formulas, tmp_path):
    pytest.importorskip("bitsandbytes")
    config = run_config(vision_base, formulas / "data.jsonl", tmp_path, quantization={"load_in_4bit": True,
                                                                                      "bnb_4bit_compute_dtype":
                                                                                      "float32"})
    loaded = pipeline.load(config)
    modules = dict(loaded.model.named_modules())
    assert type(modules["model.language_model.layers.0.self_attn.q_proj"]).__name__ == "Linear4bit"
    assert type(modules["model.visual.blocks.0.attn.qkv"]) is torch.nn.Linear
    assert type(modules["model.visual.merger.mlp.0"]) is torch.nn.Linear
    kept = "kept 16-bit (not quantized): model.visual, model.visual.merger"
    assert any(note.startswith(kept) for note in loaded.notes)


def test_text_model_rejects_image_rows(demo_base, formulas, tmp_path):
    from tests.conftest import tiny_run_config

    config = tiny_run_config(demo_base, formulas / "data.jsonl", tmp_path)
    config.data.format = "vision"
    loaded = pipeline.load(config)
    with pytest.raises(DataError, match="format vision needs a vision-language model"):
        run_data.data(loaded, config)
