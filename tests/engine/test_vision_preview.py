"""``ftengine data preview`` on image rows: a placeholder per image with the image tokens its processor
expands it to (Qwen2.5-VL's grid of merged patches, Llama 3.2 Vision's single token), the rows a run
would refuse counted as skipped, and the images in the statistics."""

from __future__ import annotations

import json
import os

import pytest
import yaml
from click.testing import CliRunner

from ftengine.cli import main


@pytest.fixture(scope="module")
def qwen_vl_base(tmp_path_factory):
    os.environ.setdefault("FTENGINE_CACHE", str(tmp_path_factory.mktemp("ftengine-cache")))
    from ftengine.demo.vision import base_model_dir

    return base_model_dir()


def preview(tmp_path, model, rows, *args, **data):
    path = tmp_path / "data.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({"model": {"name_or_path": str(model), "max_seq_length": 128},
                                      "data": {"path": str(path), **data}}))
    result = CliRunner().invoke(main, ["data", "preview", str(config), *args])
    assert result.exit_code == 0, result.output
    return result.stdout


def user_with(*images, text="Read:"):
    parts = [{"type": "image", "image": i} for i in images]
    return {"role": "user", "content": [*parts, {"type": "text", "text": text}]}


def test_qwen_vl_rows_show_each_image_with_its_tokens(qwen_vl_base, formula_images, tmp_path):
    from PIL import Image
    from transformers import AutoConfig

    from ftengine.engine import vision

    images = [str(formula_images / "images" / f"{i}.png") for i in (0, 1, 2)]
    rows = [{"messages": [user_with(images[0], images[1]), {"role": "assistant", "content": "x^2 y^3"}]},
            {"messages": [user_with(images[2]), {"role": "assistant", "content": "a+b"}]},
            {"messages": [user_with("missing.png"), {"role": "assistant", "content": "?"}]}]
    out = preview(tmp_path, qwen_vl_base, rows, "-n", "1")
    # the image tokens each image expands to, from the image processor alone: merged 2x2 patches of its grid
    processor = vision.load_processor(str(qwen_vl_base), AutoConfig.from_pretrained(str(qwen_vl_base)))
    opened = [Image.open(p).convert("RGB") for p in images]
    grids = processor.image_processor(images=opened, return_tensors="pt")["image_grid_thw"]
    tokens = (grids.prod(dim=1) // processor.image_processor.merge_size ** 2).tolist()
    first = f"<image 1: {opened[0].width}x{opened[0].height}, {tokens[0]} tokens>"
    second = f"<image 2: {opened[1].width}x{opened[1].height}, {tokens[1]} tokens>"
    assert f"<|vision_start|>{first}<|vision_end|><|vision_start|>{second}<|vision_end|>Read:" in out
    assert out.count("--- sample ") == 1 and "with 2 image(s)" in out and "[[x^2 y^3<|im_end|>" in out
    assert f"images          3 in 2 samples, {sum(tokens)} image tokens" in out
    assert "1 x bad image row" in out and "row 3: image file" in out


def test_mllama_rows_one_token_per_image_and_one_image_per_turn(mllama_base, formula_images, tmp_path):
    image = str(formula_images / "images" / "0.png")
    rows = [{"messages": [user_with(image), {"role": "assistant", "content": "x^2"}]},
            {"messages": [user_with(image, image), {"role": "assistant", "content": "y"}]},
            {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}]
    out = preview(tmp_path, mllama_base, rows)
    assert "<|start_header_id|>user<|end_header_id|>\n\n<image 1: 160x50, 1 token>Read:<|eot_id|>" in out
    assert "row 2: message 1 (user) holds 2 images; this model takes at most 1 per turn" in out
    assert "with 0 image(s)" in out  # a text-only row of a vision-language model
    assert "images          1 in 2 samples, 1 image tokens" in out
