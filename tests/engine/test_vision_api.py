"""The Python API on a vision-language checkpoint: load_model returns the processor, and the processor is what
load_dataset, train and generate take for image conversations (tiny Llama 3.2 Vision)."""

from __future__ import annotations

import pytest

import ftengine
from ftengine.core.errors import DataError


def conversation(image, answer):
    return [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": "Read:"}]},
            {"role": "assistant", "content": answer}]


def test_load_model_returns_the_processor_and_the_api_trains_with_it(mllama_base, formula_images, tmp_path, one_thread):
    from transformers import MllamaProcessor

    model, processor = ftengine.load_model(str(mllama_base), max_seq_length=64, dtype="float32")
    assert isinstance(processor, MllamaProcessor)
    assert processor.tokenizer.model_max_length == 64
    model = ftengine.add_lora(model, r=8, lora_alpha=16, use_gradient_checkpointing=False)
    images = [str(formula_images / "images" / f"{i}.png") for i in range(4)]
    rows = [{"messages": conversation(image, answer)} for image, answer in zip(images, ("x^2", "y^3", "a+b", "a-b"),
                                                                               strict=True)]
    dataset = ftengine.load_dataset(rows, processor)
    assert len(dataset) == 4 and dataset.ftengine_report.images == 4
    result = ftengine.train(model, processor, dataset, eval_dataset=ftengine.load_dataset(rows[:2], processor),
                            max_steps=2, per_device_train_batch_size=2, learning_rate=1e-3, logging_steps=1,
                            output_dir=str(tmp_path / "run"))
    assert result.steps == 2 and result.last_loss is not None
    answer = ftengine.generate(model, processor, conversation(images[0], "")[:1], max_new_tokens=3, temperature=0)
    assert isinstance(answer, str)
    two = {"role": "user", "content": [{"type": "image", "image": image} for image in images[:2]]}
    with pytest.raises(DataError, match="row 1: message 1 \\(user\\) holds 2 images; this model takes at most 1"):
        ftengine.load_dataset([{"messages": [two, {"role": "assistant", "content": "a"}]}], processor)
    with pytest.raises(DataError, match="mapped or filtered copy loses them"):
        ftengine.train(model, processor, dataset.select([0, 1]), max_steps=1, output_dir=str(tmp_path / "again"))
