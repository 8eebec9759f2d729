"""GGUF exports loaded by llama.cpp (llama-cpp-python): logits, tokenization, chat template, quantizer error.

Tiny random Llama and Qwen2 models (hidden 256 so every matrix can be K-quantized) with byte-level
BPE tokenizers trained here are exported to every quantization, run by llama.cpp, and compared
with transformers. For the quantized types, llama.cpp's own quantizer (``llama_model_quantize`` on
our F32 export) is the reference: our tensors must be as close to the weights as its tensors are,
and llama.cpp's logits from our file as close to transformers' as from its file.
"""

import ctypes
import json

import numpy as np
import pytest
import torch
from gguf import GGUFReader
from gguf import quants as gguf_quants
from tokenizers import Regex
from tokenizers import Tokenizer
from tokenizers import decoders
from tokenizers import models
from tokenizers import normalizers
from tokenizers import pre_tokenizers
from tokenizers import trainers
from transformers import LlamaConfig
from transformers import LlamaForCausalLM
from transformers import PreTrainedTokenizerFast
from transformers import Qwen2Config
from transformers import Qwen2ForCausalLM

from ftengine.plugins.exporters.gguf.exporter import GGUFExporter
from ftengine.plugins.exporters.gguf.exporter import gguf_name_of
from ftengine.plugins.exporters.gguf.imatrix import collect
from ftengine.plugins.exporters.gguf.tokenizer import GPT4O_SPLIT
from ftengine.plugins.exporters.gguf.tokenizer import LLAMA3_SPLIT
from ftengine.plugins.exporters.gguf.tokenizer import QWEN2_SPLIT
from ftengine.plugins.exporters.gguf.tokenizer import TEKKEN_SPLIT
from ftengine.plugins.exporters.gguf.writer import write_gguf

llama_cpp = pytest.importorskip("llama_cpp")

CORPUS = [
    "The quick brown fox jumps over the lazy dog. It's 2024, and we've got 12345 reasons!",
    "def add(a, b):\n    return a + b  # don't panic\n\n",
    "Ünïcödé text — naïve café, 東京, emojis 🙂 and   multiple   spaces\ttabs.",
    "User: hello there\nAssistant: General Kenobi! I'll answer; you'll see.",
]
TEXTS = [
    "Hello world, it's 3 o'clock and I've 1234567 apples.",
    "  leading spaces\n\nnew lines\t\ttabs 🙂 東京",
    "don't STOP 'til you're DONE",
]
PROMPTS = [[1, 5, 17, 200, 33, 77, 301, 12, 9, 250], [1, 400, 3, 3, 3, 99], [1, 63, 64, 65, 300, 301, 302, 111, 7]]
CHAT_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
FTYPES = {
    "q8_0": llama_cpp.LLAMA_FTYPE_MOSTLY_Q8_0,
    "q4_0": llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_0,
    "q4_k_m": llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_K_M,
    "q5_k_m": llama_cpp.LLAMA_FTYPE_MOSTLY_Q5_K_M,
    "q6_k": llama_cpp.LLAMA_FTYPE_MOSTLY_Q6_K,
}
NEW_FTYPES = {
    "q5_1": llama_cpp.LLAMA_FTYPE_MOSTLY_Q5_1,
    "q2_k": llama_cpp.LLAMA_FTYPE_MOSTLY_Q2_K,
    "q3_k_m": llama_cpp.LLAMA_FTYPE_MOSTLY_Q3_K_M,
    "iq4_xs": llama_cpp.LLAMA_FTYPE_MOSTLY_IQ4_XS,
    "q3_k_s": llama_cpp.LLAMA_FTYPE_MOSTLY_Q3_K_S,
    "q4_1": llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_1,
    "q5_0": llama_cpp.LLAMA_FTYPE_MOSTLY_Q5_0,
}
"""One mix per new type family, checked on the Llama model only."""
FLOAT_TOLERANCE = {"f32": 1e-3, "f16": 1e-2, "bf16": 1e-2}
"""Relative RMS logit error allowed for the unquantized types."""


def _tokenizer(split: str) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE(ignore_merges=True))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(split), behavior="isolated"),
         pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=480, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tok.train_from_iterator(CORPUS * 4, trainer)
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|im_end|>",
                                 pad_token="<|endoftext|>")
    hf.chat_template = CHAT_TEMPLATE
    return hf


def _model(arch: str) -> torch.nn.Module:
    common = dict(vocab_size=512, hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=128, initializer_range=0.08, rms_norm_eps=1e-6)
    torch.manual_seed(0)
    if arch == "llama":
        model = LlamaForCausalLM(LlamaConfig(**common, rope_theta=10000.0))
    elif arch == "llama-3.1-rope":
        rope = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                "high_freq_factor": 4.0, "original_max_position_embeddings": 32}
        model = LlamaForCausalLM(LlamaConfig(**common, rope_parameters=rope))
    else:
        model = Qwen2ForCausalLM(Qwen2Config(**common, tie_word_embeddings=True, rope_theta=1e6))
        with torch.no_grad():  # Qwen2 has q/k/v biases: make them matter
            for layer in model.model.layers:
                for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                    proj.bias.normal_(0, 0.5)
    return model.eval()


@pytest.fixture(scope="module")
def setups(tmp_path_factory):
    """Per architecture: model, tokenizer, transformers' logits for PROMPTS, and the F32 export."""
    built = {}
    for arch, split in [("llama", LLAMA3_SPLIT), ("qwen2", QWEN2_SPLIT), ("llama-3.1-rope", LLAMA3_SPLIT)]:
        model, tokenizer = _model(arch), _tokenizer(split)
        with torch.no_grad():
            logits = [model(torch.tensor([ids])).logits[0].numpy() for ids in PROMPTS]
        directory = tmp_path_factory.mktemp(arch)
        f32 = directory / "reference-f32.gguf"
        write_gguf(model, tokenizer, f32, "f32")
        built[arch] = dict(model=model, tokenizer=tokenizer, logits=logits, dir=directory, f32=f32)
    return built


def _llama(path, **kwargs):
    return llama_cpp.Llama(str(path), n_ctx=64, logits_all=True, verbose=False, n_threads=2, **kwargs)


def _logit_error(path, reference) -> float:
    """RMS(llama.cpp - transformers) / RMS(transformers) over all prompts and positions."""
    llm = _llama(path)
    diffs, refs = [], []
    for ids, ref in zip(PROMPTS, reference, strict=True):
        llm.reset()
        llm.eval(ids)
        diffs.append(np.asarray(llm.scores[: len(ids)]) - ref)
        refs.append(ref)
    llm.close()
    diff, ref = np.concatenate(diffs), np.concatenate(refs)
    return float(np.sqrt((diff**2).mean() / (ref**2).mean()))


def _kl(path, reference) -> float:
    """Mean KL(transformers || llama.cpp) of the next-token distributions over all prompts and positions."""
    llm = _llama(path)
    kls = []
    for ids, ref in zip(PROMPTS, reference, strict=True):
        llm.reset()
        llm.eval(ids)
        ours = np.asarray(llm.scores[: len(ids)], dtype=np.float64)
        ours = ours - np.logaddexp.reduce(ours, axis=-1, keepdims=True)
        ref = ref.astype(np.float64) - np.logaddexp.reduce(ref.astype(np.float64), axis=-1, keepdims=True)
        kls.append((np.exp(ref) * (ref - ours)).sum(axis=-1))
    llm.close()
    return float(np.concatenate(kls).mean())


def _llama_cpp_quantize(source, target, quantization: str, imatrix=None) -> None:
    """llama.cpp's llama-quantize on ``source``, with ``imatrix`` (an ImportanceMatrix) passed as its
    null-terminated array of per-tensor mean squared activations."""
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = {**FTYPES, **NEW_FTYPES}[quantization]
    entries = imatrix.llama_cpp_entries(llama_cpp) if imatrix is not None else None
    if entries is not None:
        params.imatrix = entries
    assert llama_cpp.llama_model_quantize(str(source).encode(), str(target).encode(), ctypes.byref(params)) == 0


def _tensor_errors(reference, ours, theirs, imatrix=None) -> tuple[float, float, int, int]:
    """Squared error of each file's dequantized tensors against the F32 ones (weighted by the importance
    of each column when an imatrix is given), and identical-tensor counts."""
    weights = {t.name: t for t in GGUFReader(reference).tensors}
    mine = {t.name: t for t in GGUFReader(ours).tensors}
    other = {t.name: t for t in GGUFReader(theirs).tensors}
    assert set(mine) == set(other) == set(weights)
    ours_sse = theirs_sse = 0.0
    identical = 0
    for name, tensor in weights.items():
        x = np.asarray(tensor.data, dtype=np.float32).reshape(-1)
        assert mine[name].tensor_type == other[name].tensor_type, name  # the same mix as llama-quantize
        a = gguf_quants.dequantize(mine[name].data, mine[name].tensor_type).reshape(-1)
        b = gguf_quants.dequantize(other[name].data, other[name].tensor_type).reshape(-1)
        importance = imatrix.importance(name) if imatrix is not None else None
        w = 1.0 if importance is None else np.tile(importance.numpy(), x.size // importance.numel())
        ours_sse += float((w * (a - x) ** 2).sum())
        theirs_sse += float((w * (b - x) ** 2).sum())
        identical += bool(np.array_equal(np.asarray(mine[name].data), np.asarray(other[name].data)))
    return ours_sse, theirs_sse, identical, len(weights)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("quantization", ["f32", "f16", "bf16"])
def test_float_exports_match_transformers(setups, arch, quantization):
    setup = setups[arch]
    out = setup["dir"] / quantization
    GGUFExporter().export(setup["model"], setup["tokenizer"], out, {"quantization": quantization})
    error = _logit_error(out / f"model-{quantization}.gguf", setup["logits"])
    assert error < FLOAT_TOLERANCE[quantization], error


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("quantization", list(FTYPES))
def test_quantized_exports_match_llama_cpp_quantizer(setups, arch, quantization):
    setup = setups[arch]
    ours = setup["dir"] / f"ours-{quantization}.gguf"
    theirs = setup["dir"] / f"llama-cpp-{quantization}.gguf"
    write_gguf(setup["model"], setup["tokenizer"], ours, quantization)
    _llama_cpp_quantize(setup["f32"], theirs, quantization)

    ours_sse, theirs_sse, identical, count = _tensor_errors(setup["f32"], ours, theirs)
    assert ours_sse <= 1.01 * theirs_sse, (ours_sse, theirs_sse)
    if quantization == "q8_0":
        assert identical == count  # Q8_0 is deterministic: byte for byte what llama.cpp writes

    ours_error = _logit_error(ours, setup["logits"])
    theirs_error = _logit_error(theirs, setup["logits"])
    assert ours_error <= 1.15 * theirs_error + 1e-3, (ours_error, theirs_error)


@pytest.mark.parametrize("quantization", ["q5_1", "q2_k", "q3_k_m", "iq4_xs"])
def test_new_mixes_match_llama_cpp_quantizer(setups, quantization):
    """Tensor types as llama-quantize picks them, errors at most its own, logits as close to transformers'."""
    setup = setups["llama"]
    ours = setup["dir"] / f"ours-{quantization}.gguf"
    theirs = setup["dir"] / f"llama-cpp-{quantization}.gguf"
    write_gguf(setup["model"], setup["tokenizer"], ours, quantization)
    _llama_cpp_quantize(setup["f32"], theirs, quantization)
    ours_sse, theirs_sse, _, _ = _tensor_errors(setup["f32"], ours, theirs)
    assert ours_sse <= 1.01 * theirs_sse, (ours_sse, theirs_sse)
    assert _logit_error(ours, setup["logits"]) <= 1.15 * _logit_error(theirs, setup["logits"]) + 1e-3


@pytest.mark.parametrize("quantization", ["q4_k_m", "q4_0", pytest.param("q3_k_s", marks=pytest.mark.slow),
                                          pytest.param("q5_1", marks=pytest.mark.slow),
                                          pytest.param("q4_1", marks=pytest.mark.slow),
                                          pytest.param("q5_0", marks=pytest.mark.slow)])
def test_imatrix_export_matches_llama_cpp_quantizer_with_the_same_imatrix(setups, quantization):
    """Our imatrix of the model's activations, used by our quantizers and by llama.cpp's: the same tensor
    types, an importance-weighted error at most llama.cpp's and lower than without the imatrix, and
    llama.cpp's next-token distributions no further from the float model's than without it."""
    setup = setups["llama"]
    rows = [ids * 4 for ids in PROMPTS]
    imatrix = collect(setup["model"], rows, gguf_name_of(setup["model"]), chunk_size=32)
    ours = setup["dir"] / f"ours-imatrix-{quantization}.gguf"
    plain = setup["dir"] / f"ours-plain-{quantization}.gguf"
    theirs = setup["dir"] / f"llama-cpp-imatrix-{quantization}.gguf"
    write_gguf(setup["model"], setup["tokenizer"], ours, quantization, imatrix=imatrix)
    write_gguf(setup["model"], setup["tokenizer"], plain, quantization)
    _llama_cpp_quantize(setup["f32"], theirs, quantization, imatrix)
    ours_sse, theirs_sse, _, _ = _tensor_errors(setup["f32"], ours, theirs, imatrix)
    assert ours_sse <= 1.02 * theirs_sse, (ours_sse, theirs_sse)
    plain_sse, _, _, _ = _tensor_errors(setup["f32"], plain, theirs, imatrix)
    assert ours_sse < plain_sse
    assert _kl(ours, setup["logits"]) <= _kl(plain, setup["logits"])


def test_llama3_rope_scaling_is_exported(setups):
    setup = setups["llama-3.1-rope"]
    names = {t.name for t in GGUFReader(setup["f32"]).tensors}
    assert "rope_freqs.weight" in names
    long_prompt = [[1 + (7 * i) % 450 for i in range(60)]]
    with torch.no_grad():
        reference = [setup["model"](torch.tensor(long_prompt)).logits[0].numpy()]
    llm = _llama(setup["f32"])
    llm.eval(long_prompt[0])
    diff = np.asarray(llm.scores[:60]) - reference[0]
    llm.close()
    assert np.sqrt((diff**2).mean() / (reference[0] ** 2).mean()) < 1e-3


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_tokenization_and_chat_template_match(setups, arch):
    setup = setups[arch]
    tokenizer = setup["tokenizer"]
    llm = llama_cpp.Llama(str(setup["f32"]), vocab_only=True, verbose=False)
    for text in TEXTS + CORPUS:
        expected = tokenizer(text, add_special_tokens=False)["input_ids"]
        assert llm.tokenize(text.encode(), add_bos=False, special=False) == expected, text
    assert llm.tokenize(b"<|im_start|>user", add_bos=False, special=True)[0] == tokenizer.convert_tokens_to_ids(
        "<|im_start|>"
    )
    assert llm.metadata["tokenizer.chat_template"] == tokenizer.chat_template
    assert llm.metadata["tokenizer.ggml.pre"] == ("llama-bpe" if arch == "llama" else "qwen2")
    assert llm.token_eos() == tokenizer.eos_token_id
    assert llm.detokenize(tokenizer("naïve café 🙂")["input_ids"]).decode() == "naïve café 🙂"
    llm.close()


def _sentencepiece_bpe() -> PreTrainedTokenizerFast:
    """Llama 2 / Mistral / Gemma style: BPE over ``▁``-joined text, unknown characters as byte tokens."""
    trained = Tokenizer(models.BPE(unk_token="<unk>"))
    trained.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    specials = ["<unk>", "<s>", "</s>"]
    trained.train_from_iterator(CORPUS * 3, trainers.BpeTrainer(vocab_size=300, special_tokens=specials,
                                                                show_progress=False))
    spec = json.loads(trained.to_str())["model"]
    learned = [t for t, _ in sorted(spec["vocab"].items(), key=lambda item: item[1]) if t not in specials]
    order = specials + [f"<0x{i:02X}>" for i in range(256)] + learned
    tok = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(order)}, merges=[tuple(m) for m in spec["merges"]],
                               byte_fallback=True, unk_token="<unk>", fuse_unk=True))
    tok.normalizer = trained.normalizer
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def _gpt2_style() -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=480, special_tokens=["<|endoftext|>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS * 4, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|endoftext|>")


@pytest.mark.parametrize(
    ("kind", "make", "ggml_model", "pre"),
    [
        ("sentencepiece", _sentencepiece_bpe, "llama", None),
        ("gpt-2", _gpt2_style, "gpt2", "gpt-2"),
        ("tekken", lambda: _tokenizer(TEKKEN_SPLIT), "gpt2", "tekken"),
        ("gpt-4o", lambda: _tokenizer(GPT4O_SPLIT), "gpt2", "gpt-4o"),
    ],
    ids=lambda value: value if isinstance(value, str) else None,
)
def test_other_tokenizers_tokenize_the_same(tmp_path, kind, make, ggml_model, pre):
    tokenizer = make()
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128,
                                         num_hidden_layers=1, num_attention_heads=4, max_position_embeddings=64))
    write_gguf(model, tokenizer, tmp_path / f"{kind}.gguf", "f16")
    llm = llama_cpp.Llama(str(tmp_path / f"{kind}.gguf"), vocab_only=True, verbose=False)
    assert llm.metadata["tokenizer.ggml.model"] == ggml_model
    assert llm.metadata.get("tokenizer.ggml.pre") == pre
    for text in TEXTS + CORPUS:  # TEXTS has characters the SentencePiece vocabulary lacks: byte fallback
        expected = tokenizer(text, add_special_tokens=False)["input_ids"]
        assert llm.tokenize(text.encode(), add_bos=False, special=False) == expected, text
    llm.close()
