# ruff: noqa: E402, E501, I001, B905, F821  (kept as the notebooks are written: imports where they are used)
# The ORPO notebook (Llama 3 8B on a preference set): prompt / chosen / rejected rows, trl's ORPOTrainer
# and ORPOConfig imported from trl's top level as before trl moved them to trl.experimental; the import
# changed to ftengine.compat.
# notebook_args (given by the test) holds the training arguments the notebooks share, at CPU size.
from ftengine.compat import FastLanguageModel

max_seq_length = 128
model, tokenizer = FastLanguageModel.from_pretrained(model_name=MODEL_NAME, max_seq_length=max_seq_length,  # noqa: F821
                                                     dtype=None, load_in_4bit=False)
model = FastLanguageModel.get_peft_model(model, r=8, lora_alpha=16, lora_dropout=0, bias="none",
                                         use_gradient_checkpointing="unsloth", random_state=3407)

from datasets import load_dataset

dataset = load_dataset("json", data_files=DATA_FILE, split="train")  # noqa: F821

from trl import ORPOConfig, ORPOTrainer

orpo_trainer = ORPOTrainer(
    model=model,
    train_dataset=dataset,
    tokenizer=tokenizer,
    args=ORPOConfig(**notebook_args(max_length=max_seq_length, max_completion_length=max_seq_length // 2,
                                    beta=0.1, max_steps=3, learning_rate=5e-4)),  # noqa: F821
)
orpo_trainer.train()
