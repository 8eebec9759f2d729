"""The compat names one by one: arguments, template names and mappings, data helpers, save methods."""

import json
import re

import pytest
from transformers import AutoTokenizer

from ftengine.compat import FastLanguageModel
from ftengine.compat.chat_templates import get_chat_template
from ftengine.compat.chat_templates import standardize_sharegpt
from ftengine.compat.chat_templates import to_sharegpt
from ftengine.core.errors import ConfigError
from ftengine.core.plugins import get
from ftengine.demo import ASSETS

TURNS = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Capital of Peru?"},
         {"role": "assistant", "content": "Lima."}]


@pytest.fixture
def tokenizer():
    return AutoTokenizer.from_pretrained(str(ASSETS / "tokenizer"))


@pytest.mark.parametrize("call, words", [
    (lambda: FastLanguageModel.from_pretrained(model_name="x", max_seq_lenght=10), "did you mean max_seq_length?"),
    (lambda: FastLanguageModel.get_peft_model(None, lora_alfa=16), "did you mean lora_alpha?"),
    (lambda: FastLanguageModel.from_pretrained(model_name="x", rope_scaling={"type": "linear"}), "rope_scaling"),
    (lambda: FastLanguageModel.from_pretrained(model_name="x", device_map="balanced"), "device_map='balanced'"),
    (lambda: FastLanguageModel.get_peft_model(None, use_gradient_checkpointing="fast"), "'unsloth'"),
])
def test_bad_arguments_are_named(call, words):
    with pytest.raises(ConfigError, match=words.replace("?", r"\?").replace("[", r"\[")):
        call()


def test_trl_trainers_called_with_a_typo_get_a_suggestion(tokenizer):
    from trl import SFTTrainer

    with pytest.raises(ConfigError, match=r"max_seq_lenght: unknown argument; did you mean max_seq_length\?"):
        SFTTrainer(model=None, tokenizer=tokenizer, max_seq_lenght=64)


@pytest.mark.parametrize("alias, name", [("qwen25", "qwen2.5"), ("qwen-2.5", "qwen2.5"), ("llama3", "llama-3"),
                                         ("llama-31", "llama-3.1"), ("gemma3", "gemma-3"), ("mixtral", "mistral"),
                                         ("chatml", "chatml")])
def test_unsloth_template_names(tokenizer, alias, name):
    from ftengine.compat.chat_templates import template_name

    assert template_name(alias) == name
    if alias in ("qwen25", "chatml"):  # the demo tokenizer has ChatML's tokens
        assert get_chat_template(tokenizer, alias).chat_template == get("chat_templates", name).jinja


def test_unknown_template_lists_the_known_ones(tokenizer):
    with pytest.raises(ConfigError, match="no chat template 'llama-9'; known: .*llama3.*qwen25"):
        get_chat_template(tokenizer, "llama-9")


def test_mapping_renders_sharegpt_turns_as_role_content(tokenizer):
    reference = get_chat_template(AutoTokenizer.from_pretrained(str(ASSETS / "tokenizer")), "chatml")
    expected = reference.apply_chat_template(TURNS, tokenize=False, add_generation_prompt=True)
    mapped = get_chat_template(tokenizer, "chatml", mapping={"role": "from", "content": "value", "user": "human",
                                                             "assistant": "gpt"})
    names = {"system": "system", "user": "human", "assistant": "gpt"}
    sharegpt = [{"from": names[t["role"]], "value": t["content"]} for t in TURNS]
    assert mapped.apply_chat_template(sharegpt, tokenize=False, add_generation_prompt=True) == expected
    assert mapped.apply_chat_template(TURNS, tokenize=False, add_generation_prompt=True) == expected


def test_map_eos_token(tokenizer):
    tokenizer.eos_token = "<|endoftext|>"
    assert get_chat_template(tokenizer, "chatml").eos_token == "<|im_end|>"
    tokenizer.eos_token = "<|endoftext|>"
    assert get_chat_template(tokenizer, "chatml", map_eos_token=False).eos_token == "<|endoftext|>"


def test_standardize_sharegpt_keeps_the_column():
    from datasets import Dataset

    rows = Dataset.from_list([{"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Yo"}],
                               "id": 1}])
    out = standardize_sharegpt(rows)
    assert out.column_names == ["id", "conversations"]
    assert out[0]["conversations"] == [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}]


def test_standardize_data_formats_reads_each_kind_of_conversation():
    from datasets import Dataset

    from ftengine.compat.chat_templates import standardize_data_formats
    from ftengine.core.types import RowError

    want = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Yo"}]
    sharegpt = Dataset.from_list([{"conversations": [{"from": "system", "value": "Be brief."},
                                                     {"from": "input", "value": "Hi"},
                                                     {"from": "output", "value": "Yo"}], "id": 7}])
    out = standardize_data_formats(sharegpt)
    assert out.column_names == ["id", "conversations"] and out[0] == {"id": 7, "conversations": want}
    standard = [{"messages": want}]
    assert standardize_data_formats(standard) == standard
    custom = [{"conversations": [{"role": "instruction", "content": "Hi"}, {"role": "reply", "content": "Yo"}]}]
    assert standardize_data_formats(custom, aliases_for_user=["instruction"], aliases_for_assistant=["reply"]) == [
        {"conversations": want[1:]}]
    with pytest.raises(RowError, match=r"row 1: conversations\[0\] has unknown role 'instruction'"):
        standardize_data_formats([{"conversations": want[1:]}, *custom])
    with pytest.raises(ConfigError, match="need a 'conversations' or 'messages' column, got instruction, output"):
        standardize_data_formats([{"instruction": "Hi", "output": "Yo"}])


def test_to_sharegpt_merges_columns_and_drops_empty_optional_parts():
    rows = [{"instruction": "Add", "input": "2 and 3", "output": "5"}, {"instruction": "Say hi", "input": "",
                                                                       "output": "hi"}]
    out = to_sharegpt(rows, merged_prompt="{instruction}[[ with {input}]]", output_column_name="output")
    assert [r["conversations"][0]["value"] for r in out] == ["Add with 2 and 3", "Say hi"]
    assert out[0]["conversations"][1] == {"from": "gpt", "value": "5"}
    extended = to_sharegpt(rows, merged_prompt="{instruction}", output_column_name="output",
                           conversation_extension=2)
    assert [len(r["conversations"]) for r in extended] == [4, 4]
    with pytest.raises(ValueError, match="row 0: merged_prompt names column 'question'"):
        to_sharegpt(rows, merged_prompt="{question}", output_column_name="output")


def test_save_methods_and_pushes_fail_clearly(tiny_llama, monkeypatch, tmp_path):
    from transformers import AutoModelForCausalLM

    from ftengine.compat.saving import save_pretrained_gguf

    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # no saved login
    model, tokenizer = FastLanguageModel.from_pretrained(model_name=str(tiny_llama), max_seq_length=32,
                                                         load_in_4bit=False)
    model = FastLanguageModel.get_peft_model(model, r=4, use_gradient_checkpointing=False)
    with pytest.raises(ConfigError, match="save_method must be one of lora, merged_16bit, merged_4bit"):
        model.save_pretrained_merged(str(tmp_path / "out"), tokenizer, save_method="merged_8bit")
    with pytest.raises(ConfigError, match="pass tokenizer="):  # a model the compat loader did not load
        save_pretrained_gguf(AutoModelForCausalLM.from_pretrained(str(tiny_llama)), str(tmp_path / "out"))
    with pytest.raises(ConfigError, match="needs a Hugging Face token"):
        model.push_to_hub_merged("someone/model", tokenizer)
    with pytest.raises(ConfigError, match="'owner/name'"):
        model.push_to_hub_gguf("not a repo", tokenizer, token="hf_x")
    assert not (tmp_path / "out").exists()
    model.save_pretrained_merged(str(tmp_path / "out4"), tokenizer, save_method="merged_4bit")
    written = json.loads((tmp_path / "out4" / "config.json").read_text())["quantization_config"]
    assert written["load_in_4bit"] and written["bnb_4bit_quant_type"] == "nf4"


def test_fast_inference_fails_clearly(tiny_llama, tmp_path):
    from transformers import AutoModelForCausalLM

    from ftengine.compat import SamplingParams

    model, tokenizer = FastLanguageModel.from_pretrained(model_name=str(tiny_llama), max_seq_length=32,
                                                         load_in_4bit=False)
    with pytest.raises(ConfigError, match="holds no adapter_config.json; save the adapter with model.save_lora"):
        model.load_lora(str(tmp_path / "missing"))
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "adapter_config.json").write_text("{")
    with pytest.raises(ConfigError, match="adapter_config.json is not a peft adapter config"):
        model.load_lora(str(tmp_path / "broken"))
    with pytest.raises(ConfigError, match="save_lora: the model has no LoRA adapters"):
        model.save_lora(str(tmp_path / "full"))
    assert not (tmp_path / "full").exists()
    peft_model, _ = FastLanguageModel.from_pretrained(model_name=str(tiny_llama), max_seq_length=32,
                                                      load_in_4bit=False)
    peft_model = FastLanguageModel.get_peft_model(peft_model, r=4, use_gradient_checkpointing=False)
    peft_model.save_lora(str(tmp_path / "adapter"))
    with pytest.raises(ConfigError, match="lora_request needs a LoRA model"):
        model.fast_generate("Hi", lora_request=peft_model.load_lora(str(tmp_path / "adapter")))
    with pytest.raises(ConfigError, match="load the model with FastLanguageModel.from_pretrained"):
        from ftengine.compat.fast_inference import fast_generate
        fast_generate(AutoModelForCausalLM.from_pretrained(str(tiny_llama)), "Hi")
    with pytest.raises(ConfigError, match="n and max_tokens must be at least 1"):
        SamplingParams(max_tokens=0)
    with pytest.raises(ConfigError, match="max_new_tokens: unknown argument; did you mean max_tokens"):
        peft_model.fast_generate("Hi", sampling_params={"max_new_tokens": 4})


def test_vision_model_switches_and_collator(tiny_qwen25_vl, latex_ocr_file):
    import datasets
    import torch

    from ftengine.compat import FastVisionModel
    from ftengine.compat import UnslothVisionDataCollator

    model, processor = FastVisionModel.from_pretrained(str(tiny_qwen25_vl), load_in_4bit=False, dtype=torch.float32)
    assert processor.image_processor is not None and processor.tokenizer.pad_token is not None
    with pytest.raises(ConfigError, match="pass the processor"):
        UnslothVisionDataCollator(model, processor.tokenizer)
    model = FastVisionModel.get_peft_model(model, r=4, finetune_vision_layers=False, finetune_mlp_modules=False,
                                           use_gradient_checkpointing=False)
    trained = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trained and all(".language_model." in n and ".self_attn." in n for n in trained)
    row = datasets.load_dataset("parquet", data_files=str(latex_ocr_file), split="train")[0]
    messages = [{"role": "user", "content": [{"type": "image", "image": row["image"]}]},
                {"role": "assistant", "content": [{"type": "text", "text": row["text"]}]}]
    for parts in ({}, {"instruction_part": "<|im_start|>user\n", "response_part": "<|im_start|>assistant\n"}):
        collator = UnslothVisionDataCollator(model, processor, train_on_responses_only=True, **parts)
        batch = collator([{"messages": messages}])
        answer = processor.tokenizer.decode(batch["labels"][0][batch["labels"][0] != -100])
        assert answer.startswith(row["text"] + processor.tokenizer.eos_token)
    wrong = "<start_of_turn>model\n"
    with pytest.raises(ConfigError, match=re.escape(f"response_part {wrong!r} does not open the assistant turns")):
        UnslothVisionDataCollator(model, processor, train_on_responses_only=True,
                                  instruction_part="<|im_start|>user\n", response_part=wrong)
