"""Fixtures of the compat tests: tiny Llama-3.1-style and Qwen3-style models and the notebooks' datasets."""

import json

import pytest

from ftengine.demo import ASSETS

LLAMA3_SPECIALS = ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>",
                   "<|end_of_text|>", "<|finetune_right_pad_id|>"]


def saved(model_class, config, tokenizer, path):
    """A model of ``model_class`` with seeded random weights and ``tokenizer``, written into ``path``."""
    import torch

    torch.manual_seed(0)
    model_class(config).save_pretrained(str(path))
    tokenizer.save_pretrained(str(path))
    return path


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory):
    """A random 2-layer Llama (hidden 64) with the demo's BPE plus Llama 3's special tokens."""
    from tokenizers import Tokenizer
    from transformers import LlamaConfig
    from transformers import LlamaForCausalLM
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer.from_file(str(ASSETS / "tokenizer" / "tokenizer.json"))
    bpe.add_special_tokens(LLAMA3_SPECIALS)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<|begin_of_text|>",
                                        eos_token="<|end_of_text|>", pad_token="<|finetune_right_pad_id|>")
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False)
    return saved(LlamaForCausalLM, config, tokenizer, tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def tiny_qwen3(tmp_path_factory):
    """A random 2-layer Qwen3 (q/k norms, hidden 64) with the demo's BPE plus Qwen's special tokens and
    Qwen3's own chat template (thinking blocks, ``enable_thinking``), as a Qwen3 checkpoint carries it."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast
    from transformers import Qwen3Config
    from transformers import Qwen3ForCausalLM

    from ftengine.plugins.datasets.templates import jinja

    bpe = Tokenizer.from_file(str(ASSETS / "tokenizer" / "tokenizer.json"))
    bpe.add_special_tokens(["<|endoftext|>", "<|im_start|>", "<|im_end|>"])
    bpe.add_tokens(["<think>", "</think>"])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    tokenizer.chat_template = jinja("qwen3")
    config = Qwen3Config(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=512,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                         tie_word_embeddings=True)
    return saved(Qwen3ForCausalLM, config, tokenizer, tmp_path_factory.mktemp("tiny-qwen3"))


@pytest.fixture(scope="session")
def tiny_gemma3(tmp_path_factory):
    """A random 2-layer Gemma 3 text model (sliding and global layers) with the demo's BPE plus Gemma's
    special tokens; the tokenizer puts ``<bos>`` first, as Gemma's does."""
    from tokenizers import Tokenizer
    from tokenizers.processors import TemplateProcessing
    from transformers import Gemma3ForCausalLM
    from transformers import Gemma3TextConfig
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer.from_file(str(ASSETS / "tokenizer" / "tokenizer.json"))
    bpe.add_special_tokens(["<pad>", "<eos>", "<bos>", "<start_of_turn>", "<end_of_turn>"])
    bpe.post_processor = TemplateProcessing(single="<bos> $A", pair="<bos> $A $B",
                                            special_tokens=[("<bos>", bpe.token_to_id("<bos>"))])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>")
    config = Gemma3TextConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                              num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=512,
                              sliding_window=16, layer_types=["sliding_attention", "full_attention"],
                              bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                              pad_token_id=tokenizer.pad_token_id)
    return saved(Gemma3ForCausalLM, config, tokenizer, tmp_path_factory.mktemp("tiny-gemma3"))


def demo_conversations():
    rows = [json.loads(line) for line in (ASSETS / "data.jsonl").read_text().splitlines() if line.strip()]
    return [r["messages"] for r in rows]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture
def sharegpt_file(tmp_path):
    names = {"user": "human", "assistant": "gpt", "system": "system"}
    rows = [{"conversations": [{"from": names[m["role"]], "value": m["content"]} for m in c]}
            for c in demo_conversations()[:24]]
    return write_jsonl(tmp_path / "sharegpt.jsonl", rows)


@pytest.fixture
def reasoning_file(tmp_path):
    """Rows shaped as OpenMathReasoning's: a problem and a solution that thinks first."""
    rows = []
    for convo in demo_conversations()[:12]:
        user = next(m["content"] for m in convo if m["role"] == "user")
        answer = next(m["content"] for m in convo if m["role"] == "assistant")
        rows.append({"problem": user, "generated_solution": f"<think>\nThe user asks: {user}\n</think>\n\n{answer}"})
    return write_jsonl(tmp_path / "reasoning.jsonl", rows)


@pytest.fixture
def alpaca_file(tmp_path):
    rows = []
    for i, convo in enumerate(demo_conversations()[:24]):
        user = next(m["content"] for m in convo if m["role"] == "user")
        answer = next(m["content"] for m in convo if m["role"] == "assistant")
        rows.append({"instruction": user, "input": "in one sentence" if i % 2 else "", "output": answer})
    return write_jsonl(tmp_path / "alpaca.jsonl", rows)


@pytest.fixture
def preference_file(tmp_path):
    rows = [json.loads(line) for line in (ASSETS / "preference.jsonl").read_text().splitlines() if line.strip()]
    rows = [r for r in rows if all(isinstance(r[k], str) for k in ("prompt", "chosen", "rejected"))][:16]
    return write_jsonl(tmp_path / "preference.jsonl", rows)


@pytest.fixture(scope="session")
def tiny_qwen25_vl(tmp_path_factory):
    """The vision demo's random Qwen2.5-VL (2 vision blocks, 3 language layers) with its processor files."""
    import os

    os.environ.setdefault("FTENGINE_CACHE", str(tmp_path_factory.mktemp("ftengine-cache")))
    from ftengine.demo.vision import base_model_dir

    return base_model_dir()


@pytest.fixture
def latex_ocr_file(tiny_qwen25_vl, tmp_path):
    """LaTeX-OCR-shaped rows (an ``image`` column of PNG bytes and its LaTeX ``text``) as Parquet."""
    import datasets

    from ftengine.demo.vision import data_dir

    folder = data_dir()
    rows = [json.loads(line) for line in (folder / "data.jsonl").read_text().splitlines()][:8]
    table = datasets.Dataset.from_dict(
        {"image": [{"bytes": (folder / r["image"]).read_bytes(), "path": None} for r in rows],
         "text": [r["text"] for r in rows]},
        features=datasets.Features({"image": datasets.Image(), "text": datasets.Value("string")}))
    table.to_parquet(str(tmp_path / "latex_ocr.parquet"))
    return tmp_path / "latex_ocr.parquet"


@pytest.fixture
def arithmetic_file(tmp_path):
    """The GRPO demo's questions as GSM8K-style rows: a question and its answer."""
    rows = [json.loads(line) for line in (ASSETS / "arithmetic.jsonl").read_text().splitlines() if line.strip()]
    return write_jsonl(tmp_path / "questions.jsonl", [{"question": r["messages"][-1]["content"], "answer": r["answer"]}
                                                      for r in rows[:16]])


@pytest.fixture
def kto_file(tmp_path):
    """The demo's preference pairs as unpaired rows: the chosen answer desirable, the rejected one not."""
    rows = [json.loads(line) for line in (ASSETS / "preference.jsonl").read_text().splitlines() if line.strip()]
    rows = [r for r in rows if all(isinstance(r[k], str) for k in ("prompt", "chosen", "rejected"))][:8]
    unpaired = [{"prompt": r["prompt"], "completion": r[side], "label": side == "chosen"}
                for r in rows for side in ("chosen", "rejected")]
    return write_jsonl(tmp_path / "kto.jsonl", unpaired)
