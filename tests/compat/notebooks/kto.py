# ruff: noqa: E402, E501, I001, B905, F821  (kept as the notebooks are written: imports where they are used)
# A KTO notebook: prompt / completion / label rows (a thumbs up or down per answer), trl's KTOTrainer with
# KTOConfig's beta and weights; the import changed to ftengine.compat.
# notebook_args (given by the test) holds the training arguments the notebooks share, at CPU size.
from ftengine.compat import FastLanguageModel

model, tokenizer = FastLanguageModel.from_pretrained(model_name=MODEL_NAME, max_seq_length=128,  # noqa: F821
                                                     load_in_4bit=False)
model = FastLanguageModel.get_peft_model(model, r=8, lora_alpha=16, lora_dropout=0, bias="none",
                                         use_gradient_checkpointing="unsloth", random_state=3407)

from datasets import load_dataset

dataset = load_dataset("json", data_files=DATA_FILE, split="train")  # noqa: F821

from trl import KTOConfig, KTOTrainer

kto_trainer = KTOTrainer(
    model=model,
    ref_model=None,
    args=KTOConfig(**notebook_args(max_steps=3, learning_rate=5e-4, beta=0.2, desirable_weight=1.0,
                                   undesirable_weight=1.5, max_length=128)),  # noqa: F821
    train_dataset=dataset,
    processing_class=tokenizer,
)
kto_trainer.train()
