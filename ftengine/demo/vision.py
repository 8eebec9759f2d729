"""The vision demo: a tiny Qwen2.5-VL (random initial weights) learns to read formulas.

The images are LaTeX formulas rendered with matplotlib's mathtext, each paired with its LaTeX (the
LaTeX-OCR layout: ``{"image": "images/3.png", "text": "\\frac{a}{b}"}``). ``ftengine run --demo vision``
trains LoRA on both towers through the same pipeline as a real run, on the CPU in a minute or two,
exports the adapter and the merged model, and compares the reloaded merged model's reading of a
training image with the untrained model's.
"""

from __future__ import annotations

import difflib
import json
from pathlib import Path
from typing import Any

from ftengine.core.config import RunConfig
from ftengine.core.config import validate_config
from ftengine.demo import ASSETS
from ftengine.demo import SEED
from ftengine.demo import cache_dir
from ftengine.engine.rundir import atomic_directory

FORMULAS = (
    r"x^2", r"y^3", r"a+b", r"a-b", r"\frac{a}{b}", r"\frac{1}{2}", r"\sqrt{x}", r"\sqrt{2}", r"x_1", r"x_n",
    r"e^{i\pi}", r"\alpha+\beta", r"\sum_{i}x_i", r"\int f", r"a^2+b^2", r"\pi r^2", r"\sin x", r"\cos y",
    r"\log n", r"2^{10}", r"\frac{x}{y}", r"n!", r"\lambda x", r"\theta",
)
INSTRUCTION = "Write the LaTeX of this formula."
IMAGE_TOKENS = ("<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>")
MIN_PIXELS, MAX_PIXELS = 28 * 28, 28 * 28 * 12

TEXT_CONFIG = dict(hidden_size=128, intermediate_size=384, num_hidden_layers=3, num_attention_heads=4,
                   num_key_value_heads=2, max_position_embeddings=512, rms_norm_eps=1e-6, hidden_act="silu",
                   initializer_range=0.1, rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                                           "mrope_section": [4, 6, 6]})
VISION_CONFIG = dict(depth=2, hidden_size=64, intermediate_size=128, num_heads=2, patch_size=14, spatial_merge_size=2,
                     temporal_patch_size=2, out_hidden_size=128, window_size=56, fullatt_block_indexes=[1],
                     initializer_range=0.1)


def render_formula(latex: str, path: Path) -> None:
    """``latex`` rendered by matplotlib's mathtext, black on white, to a PNG."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(1.6, 0.5), dpi=100)
    figure.text(0.5, 0.5, f"${latex}$", ha="center", va="center", fontsize=14)
    figure.savefig(path, facecolor="white")


def build_tokenizer() -> Any:
    """The demo's byte-level BPE tokenizer plus Qwen2-VL's image tokens and a chat template for image parts."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(ASSETS / "tokenizer"))
    tokenizer.add_tokens(list(IMAGE_TOKENS), special_tokens=True)
    tokenizer.chat_template = (ASSETS / "vision_chat_template.jinja").read_text()
    return tokenizer


def base_model_dir() -> Path:
    """The tiny Qwen2.5-VL with its tokenizer and image processor, built once (fixed seed) and cached."""
    target = cache_dir() / "demo-qwen2_5_vl-tiny"
    stamp = json.dumps([TEXT_CONFIG, VISION_CONFIG, MIN_PIXELS, MAX_PIXELS], sort_keys=True) + f"seed={SEED}"
    if (target / "ftengine-demo.txt").exists() and (target / "ftengine-demo.txt").read_text() == stamp:
        return target
    import torch
    from transformers import Qwen2_5_VLConfig
    from transformers import Qwen2_5_VLForConditionalGeneration
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    tokenizer = build_tokenizer()
    ids = {name: tokenizer.convert_tokens_to_ids(token) for name, token in
           zip(("vision_start_token_id", "vision_end_token_id", "image_token_id", "video_token_id"), IMAGE_TOKENS,
               strict=True)}
    special = dict(bos_token_id=None, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    config = Qwen2_5_VLConfig(text_config={**TEXT_CONFIG, "vocab_size": len(tokenizer), **special},
                              vision_config=VISION_CONFIG, tie_word_embeddings=True, **special, **ids)
    torch.manual_seed(SEED)
    model = Qwen2_5_VLForConditionalGeneration(config).to(torch.float32)
    image_processor = Qwen2VLImageProcessorPil(min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS, patch_size=14,
                                               merge_size=2, temporal_patch_size=2)
    with atomic_directory(target, overwrite=True) as staging:
        model.save_pretrained(str(staging))
        tokenizer.save_pretrained(str(staging))
        image_processor.save_pretrained(str(staging))
        (staging / "ftengine-demo.txt").write_text(stamp)
    return target


def data_dir() -> Path:
    """The formula images and ``data.jsonl`` (image path relative to it, LaTeX), rendered once and cached."""
    target = cache_dir() / "demo-formulas"
    stamp = json.dumps(FORMULAS)
    if (target / "ftengine-demo.txt").exists() and (target / "ftengine-demo.txt").read_text() == stamp:
        return target
    with atomic_directory(target, overwrite=True) as staging:
        (staging / "images").mkdir()
        lines = []
        for i, latex in enumerate(FORMULAS):
            render_formula(latex, staging / "images" / f"{i}.png")
            lines.append(json.dumps({"image": f"images/{i}.png", "text": latex}))
        (staging / "data.jsonl").write_text("\n".join(lines) + "\n")
        (staging / "ftengine-demo.txt").write_text(stamp)
    return target


def vision_demo_config(max_steps: int = 120) -> RunConfig:
    """LoRA on both towers of the tiny Qwen2.5-VL, on the formula images, exported as adapter and merged model."""
    return validate_config({
        "model": {"name_or_path": str(base_model_dir()), "max_seq_length": 128, "dtype": "float32"},
        "lora": {"r": 16, "lora_alpha": 32, "target_modules": "all-linear"},
        "data": {"path": str(data_dir() / "data.jsonl"), "format": "vision", "instruction": INSTRUCTION},
        "training": {"max_steps": max_steps, "per_device_train_batch_size": 8, "gradient_accumulation_steps": 1,
                     "learning_rate": 3e-3, "lr_scheduler_type": "cosine", "warmup_steps": 5, "logging_steps": 10,
                     "save_steps": max_steps, "gradient_checkpointing": False, "seed": SEED},
        "export": [{"format": "lora"}, {"format": "merged", "dtype": "float16"}],
        "output": {"name": "demo-vision"},
    }, source="built-in vision demo")


def read_formulas(model_dir: Path, count: int = 6, max_new_tokens: int = 16) -> list[tuple[str, str]]:
    """``(right LaTeX, the model's reading)`` for the first ``count`` formula images, with a model directory
    reloaded by plain transformers (``AutoModelForImageTextToText``)."""
    import torch
    from transformers import AutoConfig
    from transformers import AutoModelForImageTextToText

    from ftengine.engine.vision import generate_with_images
    from ftengine.engine.vision import load_processor

    processor = load_processor(str(model_dir), AutoConfig.from_pretrained(str(model_dir)))
    model = AutoModelForImageTextToText.from_pretrained(str(model_dir), dtype=torch.float32)
    images = data_dir() / "images"
    conversations = [[{"role": "user", "content": [{"type": "text", "text": INSTRUCTION},
                                                   {"type": "image", "image": str(images / f"{i}.png")}]}]
                     for i in range(count)]
    answers = generate_with_images(model, processor, conversations, max_new_tokens=max_new_tokens)
    return [(FORMULAS[i], answer.strip()) for i, answer in enumerate(answers)]


def similarity(pairs: list[tuple[str, str]]) -> float:
    """Mean character-level similarity (difflib's ratio, 1 = identical) of readings to the right LaTeX."""
    return sum(difflib.SequenceMatcher(None, a, b).ratio() for a, b in pairs) / len(pairs)


def compare_readings(merged_dir: Path) -> str:
    """The untrained base model's and the trained ``merged_dir`` model's readings of a few training images,
    and their mean similarity to the right LaTeX."""
    before, after = read_formulas(base_model_dir()), read_formulas(merged_dir)
    lines = ["", "formula images read by the untrained model and the merged model (reloaded with transformers):"]
    for (right, untrained), (_, trained) in zip(before, after, strict=True):
        lines.append(f"  {right:<16} untrained: {untrained[:24]!r:<28} trained: {trained!r}")
    lines.append(f"  similarity to the right LaTeX: untrained {similarity(before):.2f}, "
                 f"trained {similarity(after):.2f}")
    return "\n".join(lines)
