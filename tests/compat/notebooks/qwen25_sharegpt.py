# ruff: noqa: E402, E501, I001, B905, F821  (kept as the notebooks are written: imports where they are used)
# The Qwen2.5 conversational notebook: ShareGPT rows mapped onto the template (mapping=), a conversation
# built with to_sharegpt, responses only; then GGUF saving. The import changed to ftengine.compat.
# notebook_args (given by the test) holds the training arguments the notebooks share, at CPU size.
from ftengine.compat import FastLanguageModel

model, tokenizer = FastLanguageModel.from_pretrained(
    model_name=MODEL_NAME,  # noqa: F821
    max_seq_length=256,
    load_in_4bit=False,
)
model = FastLanguageModel.get_peft_model(model, r=8, lora_alpha=16, random_state=3407,
                                         use_gradient_checkpointing=False)

from ftengine.compat.chat_templates import get_chat_template
from ftengine.compat.chat_templates import to_sharegpt

tokenizer = get_chat_template(
    tokenizer,
    chat_template="qwen25",
    mapping={"role": "from", "content": "value", "user": "human", "assistant": "gpt"},
)

from datasets import load_dataset

dataset = load_dataset("json", data_files=DATA_FILE, split="train")  # noqa: F821
dataset = to_sharegpt(
    dataset,
    merged_prompt="{instruction}[[\nYour input is:\n{input}]]",
    output_column_name="output",
    conversation_extension=2,
)


def formatting_prompts_func(examples):
    convos = examples["conversations"]
    texts = [tokenizer.apply_chat_template(convo, tokenize=False, add_generation_prompt=False) for convo in convos]
    return {"text": texts}


dataset = dataset.map(formatting_prompts_func, batched=True)

from transformers import TrainingArguments
from trl import SFTTrainer

trainer = SFTTrainer(
    model=model,
    tokenizer=tokenizer,
    train_dataset=dataset,
    dataset_text_field="text",
    max_seq_length=256,
    args=TrainingArguments(**notebook_args(max_steps=4)),
)

from ftengine.compat.chat_templates import train_on_responses_only

trainer = train_on_responses_only(trainer, instruction_part="<|im_start|>user\n",
                                  response_part="<|im_start|>assistant\n")
trainer_stats = trainer.train()

gguf_files = model.save_pretrained_gguf("model_gguf", tokenizer, quantization_method=["not_quantized", "q8_0"])
