# ruff: noqa: E402, E501, I001, B905, F821  (kept as the notebooks are written: imports where they are used)
# The Qwen3 reasoning + conversational notebook (Unsloth's shape): reasoning rows (a problem and a solution
# that thinks first) and ShareGPT chat rows rendered with the checkpoint's own Qwen3 template, mixed 3:1 with
# pandas into one "text" column; then an answer with thinking switched off, streamed, and the adapter saved.
# The import changed to ftengine.compat; MODEL_NAME, REASONING_FILE and CHAT_FILE stand for the hub ids. The
# columns are passed as list(...): datasets >= 4 returns a lazy Column, which apply_chat_template does not
# take for a batch of conversations.
from ftengine.compat import FastLanguageModel

model, tokenizer = FastLanguageModel.from_pretrained(
    model_name=MODEL_NAME,
    max_seq_length=256,
    load_in_4bit=False,
    load_in_8bit=False,
    full_finetuning=False,
)

model = FastLanguageModel.get_peft_model(
    model,
    r=8,
    target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    lora_alpha=8,
    lora_dropout=0,
    bias="none",
    use_gradient_checkpointing="unsloth",
    random_state=3407,
    use_rslora=False,
    loftq_config=None,
)

from datasets import load_dataset

reasoning_dataset = load_dataset("json", data_files=REASONING_FILE, split="train")
non_reasoning_dataset = load_dataset("json", data_files=CHAT_FILE, split="train")


def generate_conversation(examples):
    problems = examples["problem"]
    solutions = examples["generated_solution"]
    conversations = []
    for problem, solution in zip(problems, solutions):
        conversations.append([
            {"role": "user", "content": problem},
            {"role": "assistant", "content": solution},
        ])
    return {"conversations": conversations}


reasoning_conversations = tokenizer.apply_chat_template(
    list(reasoning_dataset.map(generate_conversation, batched=True)["conversations"]),
    tokenize=False,
)

from ftengine.compat.chat_templates import standardize_sharegpt

dataset = standardize_sharegpt(non_reasoning_dataset)
non_reasoning_conversations = tokenizer.apply_chat_template(
    list(dataset["conversations"]),
    tokenize=False,
)

chat_percentage = 0.25

import pandas as pd

non_reasoning_subset = pd.Series(non_reasoning_conversations)
non_reasoning_subset = non_reasoning_subset.sample(
    int(len(reasoning_conversations) * (chat_percentage / (1 - chat_percentage))),
    random_state=2407,
)
data = pd.concat([
    pd.Series(reasoning_conversations),
    pd.Series(non_reasoning_subset),
])
data.name = "text"

from datasets import Dataset

combined_dataset = Dataset.from_pandas(pd.DataFrame(data))
combined_dataset = combined_dataset.shuffle(seed=3407)

from trl import SFTTrainer, SFTConfig

trainer = SFTTrainer(
    model=model,
    tokenizer=tokenizer,
    train_dataset=combined_dataset,
    eval_dataset=None,
    args=SFTConfig(**notebook_args(dataset_text_field="text", per_device_train_batch_size=2,
                                   gradient_accumulation_steps=2, warmup_steps=1, max_steps=4, learning_rate=2e-3)),
)
trainer_stats = trainer.train()

messages = [
    {"role": "user", "content": "What is the capital of France?"}
]
text = tokenizer.apply_chat_template(
    messages,
    tokenize=False,
    add_generation_prompt=True,
    enable_thinking=False,
)

from transformers import TextStreamer

_ = model.generate(
    **tokenizer(text, return_tensors="pt").to(model.device),
    max_new_tokens=16,
    temperature=0.7, top_p=0.8, top_k=20,
    streamer=TextStreamer(tokenizer, skip_prompt=True),
)

model.save_pretrained("lora_model")
tokenizer.save_pretrained("lora_model")
