# ruff: noqa: E402, E501, I001, B905, F821  (kept as the notebooks are written: imports where they are used)
# The Alpaca notebook (instruction/input/output rows in a prompt template with the EOS appended), saving
# the adapter and the merged 16-bit model; the import changed to ftengine.compat.
from ftengine.compat import FastLanguageModel
import torch

max_seq_length = 256
model, tokenizer = FastLanguageModel.from_pretrained(
    model_name=MODEL_NAME,  # noqa: F821
    max_seq_length=max_seq_length,
    dtype=None,
    load_in_4bit=False,
)
model = FastLanguageModel.get_peft_model(
    model, r=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    lora_alpha=16, lora_dropout=0, bias="none", use_gradient_checkpointing=True, random_state=3407,
)

alpaca_prompt = """Below is an instruction that describes a task, paired with an input that provides further context. Write a response that appropriately completes the request.

### Instruction:
{}

### Input:
{}

### Response:
{}"""

EOS_TOKEN = tokenizer.eos_token


def formatting_prompts_func(examples):
    instructions = examples["instruction"]
    inputs = examples["input"]
    outputs = examples["output"]
    texts = []
    for instruction, input, output in zip(instructions, inputs, outputs):
        text = alpaca_prompt.format(instruction, input, output) + EOS_TOKEN
        texts.append(text)
    return {"text": texts}


from datasets import load_dataset

dataset = load_dataset("json", data_files=DATA_FILE, split="train")  # noqa: F821
dataset = dataset.map(formatting_prompts_func, batched=True)

from trl import SFTConfig
from trl import SFTTrainer

from ftengine.compat import is_bf16_supported

trainer = SFTTrainer(
    model=model,
    tokenizer=tokenizer,
    train_dataset=dataset,
    args=SFTConfig(
        dataset_text_field="text",
        max_length=max_seq_length,
        per_device_train_batch_size=4,
        gradient_accumulation_steps=1,
        warmup_steps=1,
        max_steps=4,
        learning_rate=2e-3,
        fp16=not is_bf16_supported(),
        bf16=is_bf16_supported(),
        use_cpu=not torch.cuda.is_available(),
        logging_steps=1,
        optim="adamw_torch",
        weight_decay=0.01,
        lr_scheduler_type="linear",
        seed=3407,
        output_dir="outputs",
        report_to="none",
    ),
)
trainer_stats = trainer.train()

model.save_pretrained_merged("lora_model", tokenizer, save_method="lora")
model.save_pretrained_merged("merged_model", tokenizer, save_method="merged_16bit")
