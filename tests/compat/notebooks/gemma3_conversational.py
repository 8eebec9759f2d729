# ruff: noqa: E402, E501, I001, B905, F821  (kept as the notebooks are written: imports where they are used)
# The Gemma 3 conversational notebook (Unsloth's FastModel shape): ShareGPT-style rows through
# standardize_data_formats, the gemma-3 template with the leading <bos> removed (the tokenizer adds it),
# responses only, then an answer to a content-parts message, the adapter, the merged model and a GGUF
# (save_pretrained_gguf without the tokenizer, FastModel's quantization_type). The import changed to
# ftengine.compat; MODEL_NAME and DATA_FILE stand for the hub ids; notebook_args holds the shared arguments.
# The notebook's model comes with a processor, whose apply_chat_template returns text by default; this
# text-only model's tokenizer is asked for text with tokenize=False.
from ftengine.compat import FastModel

model, tokenizer = FastModel.from_pretrained(
    model_name=MODEL_NAME,
    max_seq_length=256,
    load_in_4bit=False,
    load_in_8bit=False,
    full_finetuning=False,
)

model = FastModel.get_peft_model(
    model,
    finetune_vision_layers=False,
    finetune_language_layers=True,
    finetune_attention_modules=True,
    finetune_mlp_modules=True,
    r=8,
    lora_alpha=8,
    lora_dropout=0,
    bias="none",
    random_state=3407,
)

from ftengine.compat.chat_templates import get_chat_template

tokenizer = get_chat_template(
    tokenizer,
    chat_template="gemma-3",
)

from datasets import load_dataset

dataset = load_dataset("json", data_files=DATA_FILE, split="train")

from ftengine.compat.chat_templates import standardize_data_formats

dataset = standardize_data_formats(dataset)


def formatting_prompts_func(examples):
    convos = examples["conversations"]
    texts = [tokenizer.apply_chat_template(convo, tokenize=False, add_generation_prompt=False).removeprefix('<bos>') for convo in convos]
    return {"text": texts}


dataset = dataset.map(formatting_prompts_func, batched=True)

from trl import SFTTrainer, SFTConfig

trainer = SFTTrainer(
    model=model,
    tokenizer=tokenizer,
    train_dataset=dataset,
    eval_dataset=None,
    args=SFTConfig(**notebook_args(dataset_text_field="text", per_device_train_batch_size=2,
                                   gradient_accumulation_steps=2, warmup_steps=1, max_steps=4)),
)

from ftengine.compat.chat_templates import train_on_responses_only

trainer = train_on_responses_only(
    trainer,
    instruction_part="<start_of_turn>user\n",
    response_part="<start_of_turn>model\n",
)
trainer_stats = trainer.train()

messages = [{
    "role": "user",
    "content": [{
        "type": "text",
        "text": "Continue the sequence: 1, 1, 2, 3, 5, 8,",
    }]
}]
text = tokenizer.apply_chat_template(
    messages,
    tokenize=False,
    add_generation_prompt=True,
)
outputs = model.generate(
    **tokenizer([text], return_tensors="pt").to(model.device),
    max_new_tokens=16,
    temperature=1.0, top_p=0.95, top_k=64,
)
answer = tokenizer.batch_decode(outputs)

model.save_pretrained("gemma-3")
tokenizer.save_pretrained("gemma-3")
model.save_pretrained_merged("gemma-3-finetune", tokenizer)
model.save_pretrained_gguf(
    "gemma-3-finetune",
    quantization_type="Q8_0",
)
