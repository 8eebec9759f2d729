# ruff: noqa: E402, E501, I001, B905, F821  (kept as the notebooks are written: imports where they are used)
# The GRPO notebook (Qwen2.5 on GSM8K, Unsloth's shape): a system prompt asking for <reasoning>/<answer>
# tags, trl's GRPOTrainer with reward functions written for trl (completions as message lists); the
# import changed to ftengine.compat, the data a file of arithmetic questions with their answers. It ends as
# the notebook does: an answer of the base model, the adapter saved, an answer with it (vLLM's
# SamplingParams imported from ftengine.compat, max_tokens at CPU size).
# notebook_args (given by the test) holds the training arguments the notebooks share, at CPU size.
from ftengine.compat import FastLanguageModel, PatchFastRL

PatchFastRL("GRPO", FastLanguageModel)

from ftengine.compat.chat_templates import get_chat_template

model, tokenizer = FastLanguageModel.from_pretrained(model_name=MODEL_NAME, max_seq_length=512,  # noqa: F821
                                                     load_in_4bit=False, fast_inference=True, max_lora_rank=8,
                                                     gpu_memory_utilization=0.6)
model = FastLanguageModel.get_peft_model(model, r=8, lora_alpha=16, lora_dropout=0, bias="none",
                                         target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                         "up_proj", "down_proj"],
                                         use_gradient_checkpointing="unsloth", random_state=3407)
tokenizer = get_chat_template(tokenizer, chat_template="llama-3.1")

import re
from datasets import load_dataset

SYSTEM_PROMPT = """
Respond in the following format:
<reasoning>
...
</reasoning>
<answer>
...
</answer>
"""


def extract_xml_answer(text: str) -> str:
    answer = text.split("<answer>")[-1]
    answer = answer.split("</answer>")[0]
    return answer.strip()


def get_questions(split="train"):
    data = load_dataset("json", data_files=DATA_FILE, split=split)  # noqa: F821
    data = data.map(lambda x: {
        "prompt": [
            {"role": "system", "content": SYSTEM_PROMPT},
            {"role": "user", "content": x["question"]},
        ],
        "answer": x["answer"],
    })
    return data


dataset = get_questions()
seen = []  # what the reward functions were handed (the test reads it)


def correctness_reward_func(prompts, completions, answer, **kwargs) -> list[float]:
    responses = [completion[0]["content"] for completion in completions]
    q = prompts[0][-1]["content"]
    extracted_responses = [extract_xml_answer(r) for r in responses]
    seen.append({"question": q, "responses": responses, "answer": list(answer)})
    return [2.0 if r == a else 0.0 for r, a in zip(extracted_responses, answer)]


def int_reward_func(completions, **kwargs) -> list[float]:
    responses = [completion[0]["content"] for completion in completions]
    extracted_responses = [extract_xml_answer(r) for r in responses]
    return [0.5 if r.isdigit() else 0.0 for r in extracted_responses]


def soft_format_reward_func(completions, **kwargs) -> list[float]:
    pattern = r"<reasoning>.*?</reasoning>\s*<answer>.*?</answer>"
    responses = [completion[0]["content"] for completion in completions]
    matches = [re.match(pattern, r) for r in responses]
    return [0.5 if match else 0.0 for match in matches]


def xmlcount_reward_func(completions, **kwargs) -> list[float]:
    contents = [completion[0]["content"] for completion in completions]
    return [0.125 * sum(tag in c for tag in ("<reasoning>\n", "\n</reasoning>\n", "\n<answer>\n", "\n</answer>"))
            for c in contents]


from trl import GRPOConfig, GRPOTrainer

training_args = GRPOConfig(**notebook_args(  # noqa: F821
    learning_rate=5e-4, adam_beta1=0.9, adam_beta2=0.99, weight_decay=0.1, warmup_steps=0.1,
    lr_scheduler_type="cosine", num_generations=4, max_completion_length=8, max_steps=2, save_steps=250,
    max_grad_norm=0.1, temperature=1.0, beta=0.04,
))
trainer = GRPOTrainer(
    model=model,
    processing_class=tokenizer,
    reward_funcs=[xmlcount_reward_func, soft_format_reward_func, int_reward_func, correctness_reward_func],
    args=training_args,
    train_dataset=dataset,
)
trainer.train()

text = tokenizer.apply_chat_template([
    {"role": "user", "content": "What is 2 + 3?"},
], tokenize=False, add_generation_prompt=True)

from ftengine.compat import SamplingParams

sampling_params = SamplingParams(
    temperature=0.8,
    top_p=0.95,
    max_tokens=16,
)
output = model.fast_generate(
    [text],
    sampling_params=sampling_params,
    lora_request=None,
)[0].outputs[0].text

model.save_lora("grpo_saved_lora")

text = tokenizer.apply_chat_template([
    {"role": "system", "content": SYSTEM_PROMPT},
    {"role": "user", "content": "What is 2 + 3?"},
], tokenize=False, add_generation_prompt=True)

output = model.fast_generate(
    text,
    sampling_params=sampling_params,
    lora_request=model.load_lora("grpo_saved_lora"),
)[0].outputs[0].text
