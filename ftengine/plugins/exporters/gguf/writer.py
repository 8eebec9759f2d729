"""Write a model as one GGUF file: metadata, vocabulary, then the tensors one at a time.

Tensors stream from :func:`ftengine.plugins.exporters.merged_tensors.iter_merged_tensors` (LoRA merged,
Hugging Face names), are renamed and reshaped by the architecture's adapter and quantized. GGUF
puts every tensor's name, shape and offset before the data, so the quantized tensors wait until
all are done: in memory when they are small (:data:`IN_MEMORY_BYTES`), else in a scratch file beside
the output, so the export holds about one tensor's work beyond the model whatever the file's size
(memory takes them only when the disk lacks the room for the scratch file). Then the header and the
data are written to ``<name>.partial`` and renamed into place, so a file under the final name is always
complete.
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
from ftengine.plugins.exporters.gguf.imatrix import ImportanceMatrix
from ftengine.plugins.exporters.gguf.tokenizer import build_vocab
from ftengine.plugins.exporters.gguf.tokenizer import write_vocab
from ftengine.plugins.exporters.merged_tensors import OriginalCheckpoint
from ftengine.plugins.exporters.merged_tensors import base_source
from ftengine.plugins.exporters.merged_tensors import iter_merged_tensors

QUANTIZATION_VERSION = 2
"""``general.quantization_version`` of the current ggml block formats."""
IN_MEMORY_BYTES = 1 << 30
"""Quantized outputs up to this size wait for the header in memory; larger ones in a scratch file (the
operating system's page cache, not the process, then holds what the disk has not taken yet)."""


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
    return int(count * mixes.QUANTIZATIONS[quantization].bits / 8 * 1.05) + (1 << 20)


def check_disk_space(directory: Path, needed: int) -> None:
    """:class:`ExportError` when ``directory``'s file system has less than ``needed`` bytes free."""
    free = shutil.disk_usage(directory).free
    if free < needed:
        raise ExportError(
            f"not enough disk space in {directory}: the GGUF export needs about {needed / 2**30:.1f} GiB, "
            f"{free / 2**30:.1f} GiB are free"
        )


def keeps_in_memory(total: int, scratch_room: dict[Path, int]) -> bool:
    """Whether ``total`` bytes of quantized tensors wait in memory rather than in scratch files: small
    outputs do; large ones only when some output directory has less free than ``scratch_room`` asks (its
    scratch files and the largest output written beside them) and a quarter of the free memory holds them."""
    if total <= IN_MEMORY_BYTES:
        return True
    roomy = all(shutil.disk_usage(directory).free >= room for directory, room in scratch_room.items())
    return not roomy and total < psutil.virtual_memory().available // 4


def add_value(writer: GGUFWriter, key: str, value: Any) -> None:
    """One metadata key, its GGUF type from the Python value (non-negative ints as uint32)."""
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


def _tensors(model: Any, layout: Any, config: Any, original: OriginalCheckpoint | None, sink: Any = None):
    """``(gguf_name, tensor)`` in llama.cpp's layout, then the layout's extra tensors (``rope_freqs``);
    ``sink(hf_name, tensor)`` sees every merged tensor first."""
    tied = bool(getattr(getattr(config, "text_config", None) or config, "tie_word_embeddings", False))
    split = getattr(layout, "split_tensor", None) or (lambda hf_name, tensor: [(hf_name, tensor)])
    for merged_name, merged in iter_merged_tensors(model, torch.float32, original):
        if sink is not None:
            sink(merged_name, merged)
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


@dataclass
class _Target:
    """One output file of a :func:`write_ggufs` call and the tensors quantized for it so far."""

    quantization: str
    path: Path
    scratch: _Scratch
    spilled: list[_Spilled]
    counts: dict[str, int]

    @property
    def partial(self) -> Path:
        return self.path.with_name(self.path.name + ".partial")


def _write_file(target: _Target, writer_args: dict[str, Any]) -> None:
    """The header, metadata, vocabulary and tensors of one target, written to ``.partial`` then renamed."""
    config, layout, vocab, name = (writer_args[k] for k in ("config", "layout", "vocab", "name"))
    arch = layout.architecture
    writer = GGUFWriter(target.partial, arch)
    writer.add_name(metadata_text(name or Path(str(getattr(config, "_name_or_path", "") or "model")).name))
    writer.add_file_type(int(mixes.QUANTIZATIONS[target.quantization].file_type))
    if target.quantization not in ("f32", "f16", "bf16"):
        writer.add_quantization_version(QUANTIZATION_VERSION)
    meta = common_metadata(config)
    meta.update(layout.metadata(config))
    for key, value in meta.items():
        add_value(writer, f"{arch}.{key}", value)
    write_vocab(writer, vocab)
    for item in target.spilled:
        writer.add_tensor_info(item.name, item.shape, np.dtype(np.uint8), item.nbytes, raw_dtype=item.qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for data in target.scratch.read(target.spilled):
        writer.write_tensor_data(data)
    writer.close()
    os.replace(target.partial, target.path)


def write_ggufs(
    model: Any,
    tokenizer: Any,
    targets: dict[str, Path],
    name: str | None = None,
    imatrix: ImportanceMatrix | None = None,
    sink: Any = None,
) -> list[str]:
    """Write ``model`` and ``tokenizer`` as one GGUF file per quantization, merging the weights once.

    Args:
        model: a Hugging Face causal LM, plain or with peft LoRA adapters (merged on the fly).
        tokenizer: its fast tokenizer.
        targets: quantization choice (a name or alias of
            :data:`ftengine.plugins.exporters.gguf.mixes.QUANTIZATIONS`) -> output file; each is
            written as ``<path>.partial`` and renamed when complete.
        name: ``general.name`` (default: the model's directory or hub name).
        imatrix: importances the K-quant, IQ4 and legacy 4-/5-bit quantizers weigh their scale searches with (and
            that change some tensor types of the mixes, as in llama.cpp).
        sink: ``sink(hf_name, tensor)`` called with every merged weight (float32, CPU) as it passes,
            the tensors the language model does not take included (a vision tower for the mmproj file).

    Returns:
        Summary lines: per file its size and the tensor types used; the base weights; conversion notes.

    Raises:
        ExportError: unknown quantization, unsupported architecture or tokenizer, too little disk
            space; all checked before anything is written.
    """
    chosen = {mixes.check_quantization(q): Path(p) for q, p in targets.items()}
    config = model.config
    layout = resolve_layout(config)
    text = getattr(config, "text_config", None) or config
    vocab = build_vocab(tokenizer, int(text.vocab_size))
    estimates = {q: estimate_bytes(model, q) for q in chosen}
    for path in chosen.values():
        path.parent.mkdir(parents=True, exist_ok=True)
    directories = {p.parent for p in chosen.values()}
    needed = {d: sum(estimates[q] for q, p in chosen.items() if p.parent == d) for d in directories}
    # each output replaces its scratch file as it is written: the scratch files and the largest output at once
    scratch_room = {d: needed[d] + max(estimates[q] for q, p in chosen.items() if p.parent == d) for d in directories}
    in_memory = keeps_in_memory(sum(estimates.values()), scratch_room)
    for directory in directories:
        check_disk_space(directory, needed[directory] if in_memory else scratch_room[directory])

    # A QLoRA run reads the base weights from the original 16-bit checkpoint rather than dequantize them.
    _, original, source = base_source(model)
    n_layers = int(text.num_hidden_layers)
    tied = bool(getattr(text, "tie_word_embeddings", False))
    n_gqa = int(text.num_attention_heads) // int(getattr(text, "num_key_value_heads", None) or text.num_attention_heads)
    files = [_Target(q, p, _Scratch(None if in_memory else p.with_name(p.name + ".tensors")), [], {})
             for q, p in chosen.items()]
    used_imatrix = 0
    try:
        label = f"GGUF {', '.join(chosen)}"
        with click.progressbar(length=len(model.state_dict()), label=label, file=sys.stderr) as bar:
            for gguf_name, tensor in _tensors(model, layout, config, original, sink):
                importance = imatrix.importance(gguf_name) if imatrix is not None else None
                if importance is not None and importance.numel() != tensor.shape[-1]:
                    raise ExportError(f"imatrix: entry {gguf_name} has {importance.numel()} values; "
                                      f"the tensor has {tensor.shape[-1]} columns")
                for target in files:
                    qtype = mixes.tensor_type(gguf_name, tuple(tensor.shape), target.quantization, n_layers, tied,
                                              n_gqa, imatrix is not None)
                    weighted = importance if qtype in quants.USES_IMPORTANCE else None
                    used_imatrix += weighted is not None
                    data = np.ascontiguousarray(quants.quantize(tensor, qtype, importance=weighted))
                    target.scratch.add(data)
                    target.spilled.append(_Spilled(gguf_name, data.shape, qtype, data.nbytes))
                    target.counts[qtype.name] = target.counts.get(qtype.name, 0) + 1
                bar.update(1)
        writer_args = {"config": config, "layout": layout, "vocab": vocab, "name": name}
        for target in files:
            _write_file(target, writer_args)
            target.scratch.discard()
    finally:
        for target in files:
            target.scratch.discard()
            target.partial.unlink(missing_ok=True)

    lines = []
    for target in files:
        types = ", ".join(f"{n} x{c}" for n, c in sorted(target.counts.items()))
        size = target.path.stat().st_size
        lines.append(f"{target.path.name}: {len(target.spilled)} tensors ({types}), {size / 2**20:.1f} MiB, "
                     f"llama.cpp architecture {layout.architecture}")
    lines.append(f"base weights: {source}")
    if imatrix is not None:
        lines.append(f"imatrix: {len(imatrix.sums)} entries, used for {used_imatrix} tensor(s)")
    lines += [f"note: {note}" for note in vocab.notes]
    return lines


def write_gguf(model: Any, tokenizer: Any, path: Path, quantization: str, name: str | None = None,
               imatrix: ImportanceMatrix | None = None) -> list[str]:
    """Write ``model`` and ``tokenizer`` as one GGUF file: :func:`write_ggufs` with one target."""
    return write_ggufs(model, tokenizer, {quantization: Path(path)}, name, imatrix)
