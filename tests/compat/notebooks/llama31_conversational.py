# ruff: noqa: E402, E501, I001, B905, F821  (kept as the notebooks are written: imports where they are used)
# The Llama-3.1 conversational notebook (ShareGPT data, Llama 3.1 template, responses only), with the
# import changed to ftengine.compat; MODEL_NAME and DATA_FILE stand for the hub ids, small step counts.
# notebook_args (given by the test) holds the training arguments the notebooks share, at CPU size.
from ftengine.compat import FastLanguageModel

max_seq_length = 128
dtype = None
load_in_4bit = False

model, tokenizer = FastLanguageModel.from_pretrained(
    model_name=MODEL_NAME,  # noqa: F821 (given by the test)
    max_seq_length=max_seq_length,
    dtype=dtype,
    load_in_4bit=load_in_4bit,
)

model = FastLanguageModel.get_peft_model(
    model,
    r=16,
    target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    lora_alpha=16,
    lora_dropout=0,
    bias="none",
    use_gradient_checkpointing="unsloth",
    random_state=3407,
    use_rslora=False,
    loftq_config=None,
)

from ftengine.compat.chat_templates import get_chat_template

tokenizer = get_chat_template(tokenizer, chat_template="llama-3.1")


def formatting_prompts_func(examples):
    convos = examples["conversations"]
    texts = [tokenizer.apply_chat_template(convo, tokenize=False, add_generation_prompt=False) for convo in convos]
    return {"text": texts}


from datasets import load_dataset

dataset = load_dataset("json", data_files=DATA_FILE, split="train")  # noqa: F821

from ftengine.compat.chat_templates import standardize_sharegpt

dataset = standardize_sharegpt(dataset)
dataset = dataset.map(formatting_prompts_func, batched=True)

from transformers import DataCollatorForSeq2Seq
from transformers import TrainingArguments
from trl import SFTTrainer

trainer = SFTTrainer(
    model=model,
    tokenizer=tokenizer,
    train_dataset=dataset,
    dataset_text_field="text",
    max_seq_length=max_seq_length,
    data_collator=DataCollatorForSeq2Seq(tokenizer=tokenizer),
    dataset_num_proc=2,
    packing=False,
    args=TrainingArguments(**notebook_args(warmup_steps=1, max_steps=8)),
)

from ftengine.compat.chat_templates import train_on_responses_only

trainer = train_on_responses_only(
    trainer,
    instruction_part="<|start_header_id|>user<|end_header_id|>\n\n",
    response_part="<|start_header_id|>assistant<|end_header_id|>\n\n",
)

trainer_stats = trainer.train()

FastLanguageModel.for_inference(model)
messages = [{"role": "user", "content": "What is the capital of Germany?"}]
inputs = tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=True,
                                       return_tensors="pt", return_dict=True).to(model.device)
outputs = model.generate(**inputs, max_new_tokens=16, use_cache=True, temperature=1.5, min_p=0.1)
answer = tokenizer.batch_decode(outputs)

model.save_pretrained("lora_model")
tokenizer.save_pretrained("lora_model")
