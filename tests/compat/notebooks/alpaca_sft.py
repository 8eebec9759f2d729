# ruff: noqa: E402, E501, I001, B905, F821  (kept as the notebooks are written: imports where they are used)
# The Alpaca notebook (instruction/input/output rows in a prompt template with the EOS appended), saving
# the adapter and the merged 16-bit model; the import changed to ftengine.compat.
# notebook_args (given by the test) holds the training arguments the notebooks share, at CPU size.
from ftengine.compat import FastLanguageModel

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

trainer = SFTTrainer(
    model=model,
    tokenizer=tokenizer,
    train_dataset=dataset,
    args=SFTConfig(**notebook_args(dataset_text_field="text", max_length=max_seq_length, warmup_steps=1, max_steps=4)),
)
trainer_stats = trainer.train()

model.save_pretrained_merged("lora_model", tokenizer, save_method="lora")
model.save_pretrained_merged("merged_model", tokenizer, save_method="merged_16bit")
