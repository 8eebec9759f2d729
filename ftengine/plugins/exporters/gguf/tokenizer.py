"""A Hugging Face fast tokenizer as a GGUF vocabulary (the ``tokenizer.ggml.*`` keys).

Two families convert:

* byte-level BPE (Llama 3, Qwen2, GPT-2 style): ``tokenizer.ggml.model = "gpt2"``, tokens, token
  types, merges and the pre-tokenizer name llama.cpp knows the split regex by
  (``tokenizer.ggml.pre``), recognised from the regex in ``tokenizer.json``;
* SentencePiece as fast tokenizers hold it (Unigram, or BPE with byte fallback: Llama 2, Mistral,
  Gemma): ``tokenizer.ggml.model = "llama"``, tokens, scores and token types.

Anything else raises :class:`ExportError` before a byte is written.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from dataclasses import field
from typing import Any

from gguf import GGUFWriter
from gguf import TokenType

from ftengine.core.errors import ExportError

LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
    r"\s*[\r\n]+|\s+(?!\S)|\s+"
)
QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
TEKKEN_SPLIT = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+|[^\r\n\p{L}\p{N}]?"
    r"[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|"
    r"\s*[\r\n]+|\s+(?!\S)|\s+"
)
GPT4O_SPLIT = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?|"
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?|"
    r"\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
PRE_TOKENIZERS: dict[str, str] = {
    LLAMA3_SPLIT: "llama-bpe",  # Llama 3.x, and every tokenizer with the cl100k split (Phi-4, ...)
    QWEN2_SPLIT: "qwen2",
    TEKKEN_SPLIT: "tekken",  # Mistral NeMo and later
    GPT4O_SPLIT: "gpt-4o",  # the o200k split (Llama 4, ...)
}
"""Split regex in ``tokenizer.json`` -> llama.cpp's ``tokenizer.ggml.pre`` name for it."""

_BYTE_TOKEN = re.compile(r"^<0x[0-9A-Fa-f]{2}>$")


@dataclass
class GGUFVocab:
    """What :func:`write_vocab` puts in the file.

    Attributes:
        model: ``gpt2`` (byte-level BPE) or ``llama`` (SentencePiece).
        pre: llama.cpp's pre-tokenizer name (byte-level BPE only).
        tokens / token_types / scores / merges: the vocabulary, in id order.
        special_ids: ``{"bos": id, "eos": id, "unk": id, "pad": id}`` for the ones the tokenizer has.
        add_bos / add_eos: whether encoding adds them.
        add_space_prefix: SentencePiece's leading ``▁`` before the first word.
        chat_template: the tokenizer's Jinja chat template, if any.
        notes: warnings for the export summary (e.g. an unrecognised pre-tokenizer).
    """

    model: str
    tokens: list[str]
    token_types: list[int]
    scores: list[float] | None = None
    merges: list[str] | None = None
    pre: str | None = None
    special_ids: dict[str, int] = field(default_factory=dict)
    add_bos: bool = False
    add_eos: bool = False
    add_space_prefix: bool | None = None
    chat_template: str | None = None
    notes: list[str] = field(default_factory=list)


def _tokenizer_json(tokenizer: Any) -> dict[str, Any]:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise ExportError(
            f"GGUF export needs a fast (tokenizers-backed) tokenizer; got {type(tokenizer).__name__}. "
            "Load it with AutoTokenizer.from_pretrained(..., use_fast=True)."
        )
    return json.loads(backend.to_str())


def _components(node: dict[str, Any] | None, key: str) -> list[dict[str, Any]]:
    """The flat list of a normalizer / pre-tokenizer tree's parts."""
    if not node:
        return []
    if node.get("type") == "Sequence":
        return [part for child in node.get(key, []) for part in _components(child, key)]
    return [node]


def _byte_level_pre(spec: dict[str, Any], notes: list[str]) -> str:
    parts = _components(spec.get("pre_tokenizer"), "pretokenizers")
    splits = [p for p in parts if p.get("type") == "Split"]
    byte_level = [p for p in parts if p.get("type") == "ByteLevel"]
    if not splits and byte_level and byte_level[0].get("use_regex", True):
        return "gpt-2"
    if len(splits) == 1:
        pattern = splits[0].get("pattern", {})
        regex = pattern.get("Regex") or pattern.get("String")
        if regex in PRE_TOKENIZERS:
            return PRE_TOKENIZERS[regex]
    notes.append(
        "the tokenizer's pre-tokenizer is not one llama.cpp knows by name; wrote tokenizer.ggml.pre = 'default' "
        "(llama.cpp may split some text differently than transformers)"
    )
    return "default"


def _token_table(tokenizer: Any, vocab_size: int) -> tuple[list[str], dict[int, Any]]:
    """Tokens by id, padded to ``vocab_size``, and the added tokens by id."""
    ids = dict(tokenizer.get_vocab())
    added = dict(getattr(tokenizer, "added_tokens_decoder", {}) or {})
    largest = max(ids.values(), default=-1)
    if largest >= vocab_size:
        raise ExportError(
            f"the tokenizer has token id {largest} but the model's embedding has only {vocab_size} rows; "
            "resize the embeddings (model.resize_token_embeddings(len(tokenizer))) before exporting"
        )
    tokens = [f"[PAD{i}]" for i in range(vocab_size)]
    for text, idx in ids.items():
        tokens[idx] = text
    return tokens, added


def _special_ids(tokenizer: Any) -> dict[str, int]:
    found = {}
    for key in ("bos", "eos", "unk", "pad"):
        idx = getattr(tokenizer, f"{key}_token_id", None)
        if isinstance(idx, int):
            found[key] = idx
    return found


def _adds_specials(tokenizer: Any, special_ids: dict[str, int]) -> tuple[bool, bool]:
    with_specials = tokenizer("a", add_special_tokens=True)["input_ids"]
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    add_bos = "bos" in special_ids and len(with_specials) > len(plain) and with_specials[0] == special_ids["bos"]
    add_eos = "eos" in special_ids and len(with_specials) > len(plain) and with_specials[-1] == special_ids["eos"]
    return add_bos, add_eos


def _chat_template(tokenizer: Any) -> str | None:
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, dict):
        return template.get("default")
    return template


def _merges(model: dict[str, Any]) -> list[str]:
    return [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]


def _types(tokens: list[str], added: dict[int, Any], ids: set[int], unk_id: int | None) -> list[int]:
    types = []
    for idx, text in enumerate(tokens):
        if idx not in ids:
            types.append(TokenType.UNUSED)
        elif idx in added:
            types.append(TokenType.CONTROL if added[idx].special else TokenType.USER_DEFINED)
        elif idx == unk_id:
            types.append(TokenType.UNKNOWN)
        elif _BYTE_TOKEN.match(text):
            types.append(TokenType.BYTE)
        else:
            types.append(TokenType.NORMAL)
    return [int(t) for t in types]


def _space_prefix(spec: dict[str, Any]) -> bool:
    for part in _components(spec.get("pre_tokenizer"), "pretokenizers"):
        if part.get("type") == "Metaspace":
            return part.get("prepend_scheme", "always") != "never" and part.get("add_prefix_space", True)
    return any(p.get("type") == "Prepend" for p in _components(spec.get("normalizer"), "normalizers"))


def build_vocab(tokenizer: Any, vocab_size: int) -> GGUFVocab:
    """Convert a Hugging Face fast tokenizer.

    Args:
        tokenizer: a ``transformers`` tokenizer backed by ``tokenizers``.
        vocab_size: rows of the model's embedding; ids past the tokenizer's are written as unused
            ``[PAD<id>]`` tokens, as llama.cpp's converter does.

    Returns:
        The vocabulary, ready for :func:`write_vocab`.

    Raises:
        ExportError: a slow tokenizer, a model type llama.cpp cannot run (WordPiece, char-level BPE
            without byte fallback, ...), or more tokens than embedding rows.
    """
    spec = _tokenizer_json(tokenizer)
    model = spec.get("model", {})
    kind = model.get("type")
    notes: list[str] = []
    tokens, added = _token_table(tokenizer, vocab_size)
    ids = set(tokenizer.get_vocab().values())
    special_ids = _special_ids(tokenizer)
    add_bos, add_eos = _adds_specials(tokenizer, special_ids)
    common = dict(special_ids=special_ids, add_bos=add_bos, add_eos=add_eos,
                  chat_template=_chat_template(tokenizer), notes=notes)
    byte_level = any(p.get("type") == "ByteLevel" for p in _components(spec.get("pre_tokenizer"), "pretokenizers"))
    if kind == "BPE" and byte_level:
        return GGUFVocab(model="gpt2", tokens=tokens, token_types=_types(tokens, added, ids, None),
                         merges=_merges(model), pre=_byte_level_pre(spec, notes), **common)
    if kind == "BPE" and model.get("byte_fallback"):
        # SentencePiece merges by score, highest first: score a merged token by minus its merge rank.
        scores = [0.0] * len(tokens)
        index = {text: idx for idx, text in enumerate(tokens)}
        for rank, merge in reversed(list(enumerate(_merges(model)))):
            merged = index.get(merge.replace(" ", "", 1))
            if merged is not None:
                scores[merged] = -float(rank)
        return GGUFVocab(model="llama", tokens=tokens, scores=scores,
                         token_types=_types(tokens, added, ids, special_ids.get("unk")),
                         add_space_prefix=_space_prefix(spec), **common)
    if kind == "Unigram":
        scores = [0.0] * len(tokens)
        for idx, (_, score) in enumerate(model.get("vocab", [])):
            scores[idx] = float(score)
        unk_id = model.get("unk_id", special_ids.get("unk"))
        return GGUFVocab(model="llama", tokens=tokens, scores=scores, token_types=_types(tokens, added, ids, unk_id),
                         add_space_prefix=_space_prefix(spec), **common)
    raise ExportError(
        f"cannot convert a {kind or 'unknown'} tokenizer to GGUF: llama.cpp runs byte-level BPE, SentencePiece "
        "Unigram and BPE with byte fallback"
    )


def write_vocab(writer: GGUFWriter, vocab: GGUFVocab) -> None:
    """Add the ``tokenizer.ggml.*`` keys (and ``tokenizer.chat_template``) to a writer."""
    writer.add_tokenizer_model(vocab.model)
    if vocab.pre is not None:
        writer.add_tokenizer_pre(vocab.pre)
    writer.add_token_list(vocab.tokens)
    writer.add_token_types(vocab.token_types)
    if vocab.scores is not None:
        writer.add_token_scores(vocab.scores)
    if vocab.merges is not None:
        writer.add_token_merges(vocab.merges)
    setters = {"bos": writer.add_bos_token_id, "eos": writer.add_eos_token_id,
               "unk": writer.add_unk_token_id, "pad": writer.add_pad_token_id}
    for key, idx in vocab.special_ids.items():
        setters[key](idx)
    writer.add_add_bos_token(vocab.add_bos)
    writer.add_add_eos_token(vocab.add_eos)
    if vocab.add_space_prefix is not None:
        writer.add_add_space_prefix(vocab.add_space_prefix)
    if vocab.chat_template:
        writer.add_chat_template(vocab.chat_template)
