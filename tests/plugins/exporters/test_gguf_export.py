"""The gguf exporter without llama.cpp: file contents, vocabularies, errors before writing, LoRA merge."""

import json

import numpy as np
import pytest
import torch
from gguf import GGUFReader
from gguf import TokenType
from pydantic import ValidationError
from tokenizers import Regex
from tokenizers import Tokenizer
from tokenizers import decoders
from tokenizers import models
from tokenizers import normalizers
from tokenizers import pre_tokenizers
from tokenizers import trainers
from transformers import GPT2Config
from transformers import GPT2LMHeadModel
from transformers import LlamaConfig
from transformers import LlamaForCausalLM
from transformers import PreTrainedTokenizerFast

from ftengine.core.errors import ExportError
from ftengine.core.plugins import get_registry
from ftengine.plugins.exporters.gguf import writer as writer_module
from ftengine.plugins.exporters.gguf.exporter import GGUFExporter
from ftengine.plugins.exporters.gguf.tokenizer import GPT4O_SPLIT
from ftengine.plugins.exporters.gguf.tokenizer import LLAMA3_SPLIT
from ftengine.plugins.exporters.gguf.tokenizer import QWEN2_SPLIT
from ftengine.plugins.exporters.gguf.tokenizer import TEKKEN_SPLIT
from ftengine.plugins.exporters.gguf.tokenizer import build_vocab

CORPUS = ["the cat sat on the mat, 123 times!", "hello world\nnew line and tabs\t", "it's a test of byte fallback é"]


def _byte_level(split: str | None = LLAMA3_SPLIT, vocab: int = 300) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE())
    if split is None:
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    else:
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Split(Regex(split), behavior="isolated"),
             pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
        )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=["<s>", "</s>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS * 3, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>")


def _sentencepiece_bpe() -> PreTrainedTokenizerFast:
    """Llama 2 style: BPE over ``▁``-joined text with byte fallback."""
    tok = Tokenizer(models.BPE(byte_fallback=True, unk_token="<unk>"))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    bytes_ = [f"<0x{i:02X}>" for i in range(256)]
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<unk>", "<s>", "</s>", *bytes_], show_progress=False)
    tok.train_from_iterator(CORPUS * 3, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def _unigram() -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.Unigram())
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    trainer = trainers.UnigramTrainer(vocab_size=120, special_tokens=["<unk>", "<s>", "</s>"], unk_token="<unk>",
                                      show_progress=False)
    tok.train_from_iterator(CORPUS * 3, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def _llama(vocab: int = 320, hidden: int = 64) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(config).eval()


def _fields(path) -> dict:
    return {name: field.contents() for name, field in GGUFReader(path).fields.items()}


def test_gguf_exporter_is_registered_with_a_strict_schema():
    exporter = get_registry("exporters")["gguf"]
    assert isinstance(exporter, GGUFExporter)
    assert exporter.options_schema().quantization == "q8_0"
    with pytest.raises(ValidationError, match="outtype"):
        exporter.options_schema(outtype="f16")
    with pytest.raises(ValidationError, match="q4_k_m"):
        exporter.options_schema(quantization="q2_k_xl")


def test_export_writes_gguf_and_modelfile(tmp_path):
    tokenizer = _byte_level()
    tokenizer.chat_template = get_registry("chat_templates")["chatml"].jinja
    lines = GGUFExporter().export(_llama(), tokenizer, tmp_path, {"quantization": "q8_0", "system": "Be brief."})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["Modelfile", "model-q8_0.gguf"]
    assert lines[0].startswith("model-q8_0.gguf: 21 tensors (F32 x5, Q8_0 x16)")
    fields = _fields(tmp_path / "model-q8_0.gguf")
    expected = {
        "general.architecture": "llama", "llama.block_count": 2, "llama.embedding_length": 64,
        "llama.feed_forward_length": 128, "llama.attention.head_count": 4, "llama.attention.head_count_kv": 2,
        "llama.context_length": 64, "llama.rope.dimension_count": 16, "llama.rope.freq_base": 10000.0,
        "tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "llama-bpe", "tokenizer.ggml.bos_token_id": 0,
        "tokenizer.ggml.eos_token_id": 1, "tokenizer.chat_template": tokenizer.chat_template,
        "general.file_type": 7, "general.quantization_version": 2,
    }
    assert {k: fields[k] for k in expected} == expected
    assert fields["llama.attention.layer_norm_rms_epsilon"] == pytest.approx(1e-6)
    assert len(fields["tokenizer.ggml.tokens"]) == 320
    assert fields["tokenizer.ggml.tokens"][300:] == [f"[PAD{i}]" for i in range(300, 320)]
    assert set(fields["tokenizer.ggml.token_type"][300:]) == {TokenType.UNUSED}
    assert fields["tokenizer.ggml.token_type"][:2] == [TokenType.CONTROL, TokenType.CONTROL]
    names = {t.name for t in GGUFReader(tmp_path / "model-q8_0.gguf").tensors}
    assert {"token_embd.weight", "output.weight", "output_norm.weight", "blk.1.ffn_down.weight"} <= names
    modelfile = (tmp_path / "Modelfile").read_text()
    assert modelfile.startswith("FROM ./model-q8_0.gguf\n")
    assert 'TEMPLATE """' in modelfile and "<|im_start|>assistant" in modelfile
    assert 'SYSTEM """Be brief."""' in modelfile
    assert "PARAMETER stop <|im_end|>" in modelfile


def test_the_report_names_the_final_directory_not_the_staging_one(tmp_path):
    from ftengine.core.config import ExportEntry
    from ftengine.engine.exporting import export_one

    tokenizer = _byte_level()
    tokenizer.chat_template = get_registry("chat_templates")["chatml"].jinja
    target = tmp_path / "gguf"
    lines = export_one(_llama(), tokenizer, ExportEntry(format="gguf", quantization="q8_0"), target)
    assert lines[-1] == f"Modelfile: ollama create <name> -f {target / 'Modelfile'}"
    assert (target / "Modelfile").is_file() and [p.name for p in tmp_path.iterdir()] == ["gguf"]


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: (GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=300)), _byte_level()),
         "cannot export model type 'gpt2' to GGUF; supported: .*llama.*qwen2"),
        (lambda: (_llama(), PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordPiece({"[UNK]": 0, "a": 1},
                                                                                                unk_token="[UNK]")))),
         "cannot convert a WordPiece tokenizer"),
        (lambda: (_llama(vocab=100), _byte_level()), "resize the embeddings"),
    ],
    ids=["architecture", "tokenizer", "vocab-size"],
)
def test_unexportable_inputs_fail_before_writing(tmp_path, make, message):
    model, tokenizer = make()
    with pytest.raises(ExportError, match=message):
        GGUFExporter().export(model, tokenizer, tmp_path, {"quantization": "f16"})
    assert list(tmp_path.iterdir()) == []


def test_unknown_quantization_and_short_disk_fail_before_writing(tmp_path, monkeypatch):
    with pytest.raises(ExportError, match="q4_k_m"):
        GGUFExporter().export(_llama(), _byte_level(), tmp_path, {"quantization": "q3_k_xl"})

    class Usage:
        free = 1000

    monkeypatch.setattr(writer_module.shutil, "disk_usage", lambda path: Usage())
    with pytest.raises(ExportError, match="not enough disk space"):
        GGUFExporter().export(_llama(), _byte_level(), tmp_path, None)
    assert list(tmp_path.iterdir()) == []


def test_large_outputs_wait_in_a_scratch_file_unless_the_disk_lacks_the_room(tmp_path, monkeypatch):
    import collections

    usage = collections.namedtuple("usage", "total used free")
    memory = collections.namedtuple("memory", "available")
    large = 4 * writer_module.IN_MEMORY_BYTES
    monkeypatch.setattr(writer_module.psutil, "virtual_memory", lambda: memory(64 * large))
    assert writer_module.keeps_in_memory(writer_module.IN_MEMORY_BYTES, {tmp_path: large})
    monkeypatch.setattr(writer_module.shutil, "disk_usage", lambda path: usage(0, 0, 2 * large))
    assert not writer_module.keeps_in_memory(large, {tmp_path: 2 * large})  # room for the scratch file too
    monkeypatch.setattr(writer_module.shutil, "disk_usage", lambda path: usage(0, 0, 2 * large - 1))
    assert writer_module.keeps_in_memory(large, {tmp_path: 2 * large})  # not: memory holds them
    monkeypatch.setattr(writer_module.psutil, "virtual_memory", lambda: memory(large))
    assert not writer_module.keeps_in_memory(large, {tmp_path: 2 * large})  # neither: the disk check says so


def test_scratch_file_gives_the_same_file_as_memory(tmp_path, monkeypatch):
    model, tokenizer = _llama(hidden=256), _byte_level()
    writer_module.write_gguf(model, tokenizer, tmp_path / "memory.gguf", "q4_k_m")
    writer_module.write_gguf(model, tokenizer, tmp_path / "memory-q8.gguf", "q8_0")
    monkeypatch.setattr(writer_module, "IN_MEMORY_BYTES", 0)
    writer_module.write_gguf(model, tokenizer, tmp_path / "scratch.gguf", "q4_k_m")
    assert (tmp_path / "memory.gguf").read_bytes() == (tmp_path / "scratch.gguf").read_bytes()
    # several files of one pass, each written from its own scratch file
    out = tmp_path / "together"
    writer_module.write_ggufs(model, tokenizer, {"q4_k_m": out / "a.gguf", "q8_0": out / "b.gguf"})
    assert (out / "a.gguf").read_bytes() == (tmp_path / "memory.gguf").read_bytes()
    assert (out / "b.gguf").read_bytes() == (tmp_path / "memory-q8.gguf").read_bytes()
    assert sorted(p.name for p in out.iterdir()) == ["a.gguf", "b.gguf"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["memory-q8.gguf", "memory.gguf", "scratch.gguf", "together"]


@pytest.mark.parametrize("scratch_file", [False, True])
def test_interrupted_export_leaves_no_file(tmp_path, monkeypatch, scratch_file):
    quantize = writer_module.quants.quantize
    calls = []

    def interrupted(tensor, qtype, **kwargs):
        calls.append(qtype)
        if len(calls) == 5:
            raise KeyboardInterrupt
        return quantize(tensor, qtype, **kwargs)

    monkeypatch.setattr(writer_module.quants, "quantize", interrupted)
    if scratch_file:
        monkeypatch.setattr(writer_module, "IN_MEMORY_BYTES", 0)
    with pytest.raises(KeyboardInterrupt):
        writer_module.write_gguf(_llama(), _byte_level(), tmp_path / "m.gguf", "q8_0")
    assert list(tmp_path.iterdir()) == []


def test_lora_is_merged_into_the_exported_weights(tmp_path):
    from peft import LoraConfig
    from peft import get_peft_model

    base = _llama()
    peft_model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["v_proj"]))
    layer = peft_model.base_model.model.model.layers[0].self_attn.v_proj
    torch.nn.init.normal_(layer.lora_B["default"].weight, std=0.5)
    expected = (layer.base_layer.weight + layer.get_delta_weight("default")).detach()
    writer_module.write_gguf(peft_model, _byte_level(), tmp_path / "m.gguf", "f32")
    tensors = {t.name: t for t in GGUFReader(tmp_path / "m.gguf").tensors}
    got = np.asarray(tensors["blk.0.attn_v.weight"].data).reshape(expected.shape)
    np.testing.assert_allclose(got, expected.numpy(), rtol=1e-5, atol=1e-6)
    assert not any("lora" in name for name in tensors)


@pytest.mark.parametrize(
    ("split", "name"),
    [(LLAMA3_SPLIT, "llama-bpe"), (QWEN2_SPLIT, "qwen2"), (TEKKEN_SPLIT, "tekken"), (GPT4O_SPLIT, "gpt-4o")],
)
def test_known_pre_tokenizers(split, name):
    assert build_vocab(_byte_level(split), 300).pre == name


def test_other_pre_tokenizers():
    assert build_vocab(_byte_level(split=None), 300).pre == "gpt-2"
    odd = build_vocab(_byte_level(split=r"\w+|\s+|[^\w\s]+"), 300)
    assert odd.pre == "default" and "not one llama.cpp knows" in odd.notes[0]


def test_sentencepiece_bpe_vocab():
    tokenizer = _sentencepiece_bpe()
    vocab = build_vocab(tokenizer, 400)
    assert vocab.model == "llama" and vocab.pre is None and vocab.merges is None
    assert vocab.add_bos is False and vocab.add_space_prefix is True
    ids = tokenizer.get_vocab()
    assert vocab.token_types[ids["<unk>"]] == TokenType.CONTROL  # an added special token
    assert vocab.token_types[ids["<0x41>"]] == TokenType.CONTROL
    merges = json.loads(tokenizer.backend_tokenizer.to_str())["model"]["merges"]
    # a token made by an earlier merge scores higher (llama.cpp merges the best-scoring pair first)
    scores = [vocab.scores[ids["".join(pair)]] for pair in merges]
    assert scores[0] == 0.0 and scores == sorted(scores, reverse=True) and scores[-1] < -len(merges) / 2


def test_unigram_vocab():
    tokenizer = _unigram()
    vocab = build_vocab(tokenizer, 130)
    assert vocab.model == "llama" and vocab.add_space_prefix is True
    spec_scores = [score for _, score in json.loads(tokenizer.backend_tokenizer.to_str())["model"]["vocab"]]
    assert vocab.scores[: len(spec_scores)] == pytest.approx(spec_scores)
    assert vocab.tokens[-1] == "[PAD129]"
    assert vocab.special_ids == {"bos": 1, "eos": 2, "unk": 0}


def test_qlora_export_reads_the_original_16bit_weights(tmp_path):
    from peft import LoraConfig
    from peft import get_peft_model
    from transformers import BitsAndBytesConfig

    original = _llama()
    original.save_pretrained(tmp_path / "base")
    quantized = LlamaForCausalLM.from_pretrained(
        tmp_path / "base", quantization_config=BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4")
    )
    peft_model = get_peft_model(quantized, LoraConfig(r=4, lora_alpha=8, target_modules=["o_proj"]))
    layer = peft_model.base_model.model.model.layers[1].self_attn.o_proj
    torch.nn.init.normal_(layer.lora_B["default"].weight, std=0.5)
    expected = original.model.layers[1].self_attn.o_proj.weight + layer.get_delta_weight("default").float()
    lines = writer_module.write_gguf(peft_model, _byte_level(), tmp_path / "m.gguf", "f32")
    assert any(line.startswith("base weights: original 16-bit checkpoint") for line in lines)
    tensors = {t.name: t for t in GGUFReader(tmp_path / "m.gguf").tensors}
    got = np.asarray(tensors["blk.1.attn_output.weight"].data).reshape(expected.shape)
    np.testing.assert_allclose(got, expected.detach().numpy(), rtol=1e-5, atol=1e-6)
