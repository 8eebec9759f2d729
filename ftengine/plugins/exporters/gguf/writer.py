"""Write a model as one GGUF file: metadata, vocabulary, then the tensors one at a time.

Tensors stream from :func:`ftengine.plugins.exporters.merged_tensors.iter_merged_tensors` (LoRA merged,
Hugging Face names), are renamed and reshaped by the architecture's adapter and quantized. GGUF
puts every tensor's name, shape and offset before the data, so the quantized tensors wait until
all are done: in memory when the file is small next to the free memory, else in a scratch file
beside the output. Then the header and the data are written to ``<name>.partial`` and renamed
into place, so a file under the final name is always complete.
"""

from __future__ import annotations

import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click
import numpy as np
import psutil
import torch
from gguf import GGMLQuantizationType
from gguf import GGUFValueType
from gguf import GGUFWriter

from ftengine.core.errors import ExportError
from ftengine.core.plugins import adapter_for_model_type
from ftengine.core.plugins import get_registry
from ftengine.plugins.exporters.gguf import mixes
from ftengine.plugins.exporters.gguf import quants
from ftengine.plugins.exporters.gguf.tokenizer import build_vocab
from ftengine.plugins.exporters.gguf.tokenizer import write_vocab
from ftengine.plugins.exporters.merged_tensors import OriginalCheckpoint
from ftengine.plugins.exporters.merged_tensors import base_source
from ftengine.plugins.exporters.merged_tensors import iter_merged_tensors

BITS_PER_WEIGHT = {"f32": 32.0, "f16": 16.0, "bf16": 16.0, "q8_0": 8.5, "q4_0": 4.5,
                   "q4_k_m": 4.9, "q5_k_m": 5.7, "q6_k": 6.5625}
"""Average bits per weight of each choice, for the disk-space estimate."""

QUANTIZATION_VERSION = 2
"""``general.quantization_version`` of the current ggml block formats."""


@dataclass
class _Spilled:
    name: str
    shape: tuple[int, ...]  # of the uint8 byte array
    qtype: GGMLQuantizationType
    nbytes: int


class _Scratch:
    """Quantized tensors waiting for the header: a list in memory, or a file at ``path``."""

    def __init__(self, path: Path | None):
        self.path = path
        self.arrays: list[np.ndarray] = []
        self.file = open(path, "wb") if path is not None else None

    def add(self, data: np.ndarray) -> None:
        if self.file is None:
            self.arrays.append(data)
        else:
            data.tofile(self.file)

    def read(self, items: list[_Spilled]):
        """The arrays back, in the order they were added."""
        if self.file is None:
            yield from self.arrays
            return
        self.file.close()
        with open(self.path, "rb") as source:
            for item in items:
                yield np.fromfile(source, dtype=np.uint8, count=item.nbytes)

    def discard(self) -> None:
        self.arrays.clear()
        if self.file is not None:
            self.file.close()
            self.path.unlink(missing_ok=True)


def resolve_layout(config: Any) -> Any:
    """The GGUF layout (:class:`ftengine.core.types.GGUFSupport`) of the adapter serving ``config.model_type``.

    Raises:
        ExportError: no adapter serves the model type, or it has no ``gguf`` layout; the message
            lists the model types that can be exported.
    """
    adapter = adapter_for_model_type(config.model_type)
    layout = getattr(adapter, "gguf", None)
    if layout is None:
        exportable = sorted(t for a in get_registry("models").values() if getattr(a, "gguf", None)
                            for t in a.model_types)
        raise ExportError(
            f"cannot export model type {config.model_type!r} to GGUF; supported: {', '.join(exportable) or '(none)'}"
        )
    return layout


def common_metadata(config: Any) -> dict[str, Any]:
    """The ``{arch}.*`` keys every llama.cpp decoder reads, from a Hugging Face config (unprefixed)."""
    text = getattr(config, "text_config", None) or config
    heads = int(text.num_attention_heads)
    meta: dict[str, Any] = {
        "context_length": int(text.max_position_embeddings),
        "embedding_length": int(text.hidden_size),
        "block_count": int(text.num_hidden_layers),
        "feed_forward_length": int(text.intermediate_size),
        "attention.head_count": heads,
        "attention.head_count_kv": int(getattr(text, "num_key_value_heads", None) or heads),
        "attention.layer_norm_rms_epsilon": float(text.rms_norm_eps),
    }
    head_dim = getattr(text, "head_dim", None)
    if head_dim and int(head_dim) != text.hidden_size // heads:
        meta["attention.key_length"] = int(head_dim)
        meta["attention.value_length"] = int(head_dim)
    return meta


def estimate_bytes(model: Any, quantization: str) -> int:
    """Rough size of the GGUF file: parameter count times the choice's bits per weight, plus 5%.

    bitsandbytes 4-bit weights are stored two to a byte: they count twice.
    """
    count = sum(p.numel() * (2 if p.dtype == torch.uint8 else 1) for p in model.parameters())
    return int(count * BITS_PER_WEIGHT[quantization] / 8 * 1.05) + (1 << 20)


def check_disk_space(directory: Path, needed: int) -> None:
    """:class:`ExportError` when ``directory``'s file system has less than ``needed`` bytes free."""
    free = shutil.disk_usage(directory).free
    if free < needed:
        raise ExportError(
            f"not enough disk space in {directory}: the GGUF export needs about {needed / 2**30:.1f} GiB, "
            f"{free / 2**30:.1f} GiB are free"
        )


def _add_value(writer: GGUFWriter, key: str, value: Any) -> None:
    if isinstance(value, bool):
        writer.add_bool(key, value)
    elif isinstance(value, int):
        writer.add_uint32(key, value) if value >= 0 else writer.add_int32(key, value)
    elif isinstance(value, float):
        writer.add_float32(key, value)
    elif isinstance(value, str):
        writer.add_string(key, value)
    elif isinstance(value, (list, tuple)):
        writer.add_array(key, list(value))
    else:
        writer.add_key_value(key, value, GGUFValueType.get_type(value))


def _tensors(model: Any, layout: Any, config: Any, original: OriginalCheckpoint | None):
    """``(gguf_name, tensor)`` in llama.cpp's layout, then the layout's extra tensors (``rope_freqs``)."""
    tied = bool(getattr(getattr(config, "text_config", None) or config, "tie_word_embeddings", False))
    split = getattr(layout, "split_tensor", None) or (lambda hf_name, tensor: [(hf_name, tensor)])
    for merged_name, merged in iter_merged_tensors(model, torch.float32, original):
        for hf_name, tensor in split(merged_name, merged):
            name = layout.tensor_name(hf_name)
            if name is None or (tied and name == "output.weight"):
                continue
            yield name, layout.tensor(hf_name, tensor, config)
    yield from layout.extra_tensors(config).items()


def metadata_text(text: str, limit: int = 256) -> str:
    """A GGUF string from a user's path or name: printable characters only, bounded, never empty."""
    clean = "".join(c if c.isprintable() else "_" for c in text)[:limit].strip()
    return clean or "model"


def write_gguf(model: Any, tokenizer: Any, path: Path, quantization: str, name: str | None = None) -> list[str]:
    """Write ``model`` and ``tokenizer`` as a GGUF file.

    Args:
        model: a Hugging Face causal LM, plain or with peft LoRA adapters (merged on the fly).
        tokenizer: its fast tokenizer.
        path: the output file; written as ``<path>.partial`` and renamed when complete.
        quantization: one of :data:`ftengine.plugins.exporters.gguf.mixes.QUANTIZATIONS`.
        name: ``general.name`` (default: the model's directory or hub name).

    Returns:
        Summary lines: the file, its size, the tensor types used, and any conversion notes.

    Raises:
        ExportError: unknown quantization, unsupported architecture or tokenizer, too little disk
            space; all checked before anything is written.
    """
    quantization = mixes.check_quantization(quantization)
    config = model.config
    layout = resolve_layout(config)
    text = getattr(config, "text_config", None) or config
    vocab = build_vocab(tokenizer, int(text.vocab_size))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    estimate = estimate_bytes(model, quantization)
    in_memory = estimate < psutil.virtual_memory().available // 4
    check_disk_space(path.parent, estimate if in_memory else 2 * estimate)  # a scratch file needs the room twice

    # A QLoRA run reads the base weights from the original 16-bit checkpoint rather than dequantize them.
    _, original, source = base_source(model)
    arch = layout.architecture
    n_layers = int(text.num_hidden_layers)
    tied = bool(getattr(text, "tie_word_embeddings", False))
    partial = path.with_name(path.name + ".partial")
    scratch = _Scratch(None if in_memory else path.with_name(path.name + ".tensors"))
    spilled: list[_Spilled] = []
    counts: dict[str, int] = {}
    try:
        with click.progressbar(length=len(model.state_dict()), label=f"GGUF {quantization}", file=sys.stderr) as bar:
            for gguf_name, tensor in _tensors(model, layout, config, original):
                qtype = mixes.tensor_type(gguf_name, tuple(tensor.shape), quantization, n_layers, tied)
                data = np.ascontiguousarray(quants.quantize(tensor, qtype))
                scratch.add(data)
                spilled.append(_Spilled(gguf_name, data.shape, qtype, data.nbytes))
                counts[qtype.name] = counts.get(qtype.name, 0) + 1
                bar.update(1)

        writer = GGUFWriter(partial, arch)
        writer.add_name(metadata_text(name or Path(str(getattr(config, "_name_or_path", "") or "model")).name))
        writer.add_file_type(int(mixes.QUANTIZATIONS[quantization][1]))
        if quantization not in ("f32", "f16", "bf16"):
            writer.add_quantization_version(QUANTIZATION_VERSION)
        meta = common_metadata(config)
        meta.update(layout.metadata(config))
        for key, value in meta.items():
            _add_value(writer, f"{arch}.{key}", value)
        write_vocab(writer, vocab)
        for item in spilled:
            writer.add_tensor_info(item.name, item.shape, np.dtype(np.uint8), item.nbytes, raw_dtype=item.qtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for data in scratch.read(spilled):
            writer.write_tensor_data(data)
        writer.close()
        os.replace(partial, path)
    finally:
        scratch.discard()
        partial.unlink(missing_ok=True)

    types = ", ".join(f"{n} x{c}" for n, c in sorted(counts.items()))
    size = path.stat().st_size
    lines = [f"{path.name}: {len(spilled)} tensors ({types}), {size / 2**20:.1f} MiB, llama.cpp architecture {arch}"]
    lines.append(f"base weights: {source}")
    lines += [f"note: {note}" for note in vocab.notes]
    return lines

