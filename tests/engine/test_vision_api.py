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
    split = dataset.shuffle(seed=0).train_test_split(test_size=0.5, seed=0)
    result = ftengine.train(model, processor, split["train"].map(lambda row: {"kept": 1}), max_steps=1,
                            eval_dataset=split["test"], output_dir=str(tmp_path / "split"))
    assert result.steps == 1
    with pytest.raises(DataError, match="keeps its 'row' and 'row_set' columns"):
        ftengine.train(model, processor, dataset.remove_columns("row_set"), max_steps=1,
                       output_dir=str(tmp_path / "again"))


def test_copies_of_a_vision_dataset_find_their_own_rows(mllama_base, formula_images):
    from ftengine.engine import vision_api

    _, processor = ftengine.load_model(str(mllama_base), max_seq_length=64, dtype="float32")
    answers = ("x^2", "y^3", "a+b", "a-b", "z")
    images = [str(formula_images / "images" / f"{i}.png") for i in range(len(answers))]
    dataset = ftengine.load_dataset([{"messages": conversation(image, answer)}
                                     for image, answer in zip(images, answers, strict=True)], processor)
    other = ftengine.load_dataset([{"messages": conversation(images[0], "other")}], processor)
    split = dataset.shuffle(seed=3).train_test_split(test_size=2, seed=3)
    train_ds, eval_ds, collator = vision_api.collated(processor, split["train"].filter(lambda r: r["row"] != 4),
                                                      other)
    expected = [answers[i] for i in split["train"]["row"] if i != 4] + ["other"]
    assert [row["messages"][1]["content"] for row in collator.rows] == expected
    assert train_ds["row"] == list(range(len(expected) - 1)) and eval_ds["row"] == [len(expected) - 1]
    with pytest.raises(DataError, match="holds no rows"):
        vision_api.collated(processor, dataset.select([]))
