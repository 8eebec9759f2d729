# ruff: noqa: E402, E501, I001, B905, F821  (kept as the notebooks are written: imports where they are used)
# The Qwen2.5-VL LaTeX-OCR notebook: FastVisionModel with LoRA on both towers, image conversations built from
# image + text rows, generation from the processor's inputs, trl's SFTTrainer with UnslothVisionDataCollator;
# the import changed to ftengine.compat.
# notebook_args (given by the test) holds the training arguments the notebooks share, at CPU size.
from ftengine.compat import FastVisionModel

model, tokenizer = FastVisionModel.from_pretrained(
    MODEL_NAME,  # noqa: F821
    load_in_4bit=False,
    use_gradient_checkpointing="unsloth",
)

model = FastVisionModel.get_peft_model(
    model,
    finetune_vision_layers=True,
    finetune_language_layers=True,
    finetune_attention_modules=True,
    finetune_mlp_modules=True,
    r=16,
    lora_alpha=16,
    lora_dropout=0,
    bias="none",
    random_state=3407,
    use_rslora=False,
    loftq_config=None,
)

from datasets import load_dataset

dataset = load_dataset("parquet", data_files=DATA_FILE, split="train")  # noqa: F821

instruction = "Write the LaTeX representation for this image."


def convert_to_conversation(sample):
    conversation = [
        {"role": "user", "content": [{"type": "text", "text": instruction}, {"type": "image", "image": sample["image"]}]},
        {"role": "assistant", "content": [{"type": "text", "text": sample["text"]}]},
    ]
    return {"messages": conversation}


converted_dataset = [convert_to_conversation(sample) for sample in dataset]

FastVisionModel.for_inference(model)

image = dataset[2]["image"]
messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": instruction}]}]
input_text = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
inputs = tokenizer(image, input_text, add_special_tokens=False, return_tensors="pt").to(model.device)

from transformers import TextStreamer

text_streamer = TextStreamer(tokenizer, skip_prompt=True)
before = model.generate(**inputs, streamer=text_streamer, max_new_tokens=8, use_cache=True, temperature=1.5, min_p=0.1)

from ftengine.compat import UnslothVisionDataCollator
from trl import SFTConfig
from trl import SFTTrainer

FastVisionModel.for_training(model)

trainer = SFTTrainer(
    model=model,
    tokenizer=tokenizer,
    data_collator=UnslothVisionDataCollator(model, tokenizer),
    train_dataset=converted_dataset,
    args=SFTConfig(
        **notebook_args(per_device_train_batch_size=2, warmup_steps=1, max_steps=3),
        remove_unused_columns=False,
        dataset_text_field="",
        dataset_kwargs={"skip_prepare_dataset": True},
        max_length=256,
    ),
)
trainer_stats = trainer.train()

model.save_pretrained("lora_model")
tokenizer.save_pretrained("lora_model")
