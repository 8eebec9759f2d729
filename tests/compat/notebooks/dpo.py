# ruff: noqa: E402, E501, I001, B905, F821  (kept as the notebooks are written: imports where they are used)
# The DPO notebook (Zephyr style): prompt/chosen/rejected strings, trl's DPOTrainer with beta and
# lengths; the import changed to ftengine.compat.
# notebook_args (given by the test) holds the training arguments the notebooks share, at CPU size.
from ftengine.compat import FastLanguageModel
from ftengine.compat import PatchDPOTrainer

PatchDPOTrainer()

model, tokenizer = FastLanguageModel.from_pretrained(model_name=MODEL_NAME, max_seq_length=128,  # noqa: F821
                                                     dtype=None, load_in_4bit=False)
model = FastLanguageModel.get_peft_model(model, r=8, lora_alpha=16, lora_dropout=0, bias="none",
                                         use_gradient_checkpointing="unsloth", random_state=3407)

from datasets import load_dataset

raw_datasets = load_dataset("json", data_files=DATA_FILE, split="train")  # noqa: F821

from trl import DPOConfig
from trl import DPOTrainer

dpo_trainer = DPOTrainer(
    model=model,
    ref_model=None,
    args=DPOConfig(**notebook_args(warmup_steps=0.1, max_steps=4, learning_rate=5e-4, weight_decay=0.0, seed=42)),
    beta=0.1,
    train_dataset=raw_datasets,
    tokenizer=tokenizer,
    max_length=128,
    max_prompt_length=64,
)
dpo_trainer.train()
