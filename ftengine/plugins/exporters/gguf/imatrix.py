"""Importance matrices: the mean squared activation of every input column of every linear layer.

:func:`collect` runs the model (LoRA active, which computes the merged model's function) over
calibration tokens with forward hooks at each linear layer's input and sums ``x**2`` per column;
entries are named by the layers' GGUF weight names, as llama.cpp's ``llama-imatrix`` names them.
Files are read and written in llama.cpp's two formats:

* GGUF (current ``llama-imatrix``): ``general.type = "imatrix"``, ``imatrix.datasets``,
  ``imatrix.chunk_count``, ``imatrix.chunk_size``, and per weight an F32 ``<name>.in_sum2``
  ``[1, cols]`` (the sum of squares) and ``<name>.counts`` ``[1, 1]`` (the tokens summed over);
* legacy ``.dat``: ``int32`` entry count; per entry ``int32`` name length, name, ``int32`` ncall,
  ``int32`` nval, ``nval`` float32 values (the mean times ncall); then ``int32`` chunk count,
  ``int32`` length and name of the dataset.
"""

from __future__ import annotations

import ctypes
import struct
from collections.abc import Callable
from collections.abc import Iterable
from collections.abc import Iterator
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from dataclasses import field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from gguf import GGUFReader
from gguf import GGUFWriter
from torch import nn

from ftengine.core.errors import ExportError
from ftengine.core.kernels import get_op
from ftengine.core.plugins import adapter_for_model_type
from ftengine.plugins.exporters.merged_tensors import checkpoint_layer_name


@dataclass
class ImportanceMatrix:
    """Per-weight sums of squared input activations.

    Attributes:
        sums: GGUF weight name -> ``(cols,)`` float64 sum of ``x**2`` over the tokens seen.
        counts: GGUF weight name -> the number of tokens summed.
        chunk_count: calibration chunks run.
        chunk_size: tokens per chunk.
        datasets: where the calibration text came from.
    """

    sums: dict[str, torch.Tensor] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=dict)
    chunk_count: int = 0
    chunk_size: int = 0
    datasets: list[str] = field(default_factory=list)

    def importance(self, name: str) -> torch.Tensor | None:
        """The mean squared activation of each input column of weight ``name`` (float32), if recorded."""
        if name not in self.sums or not self.counts.get(name):
            return None
        return (self.sums[name] / self.counts[name]).float()

    def llama_cpp_entries(self, llama_cpp: Any) -> Any:
        """The means as llama-cpp-python's null-terminated ``llama_model_imatrix_data`` array, for
        ``llama_model_quantize_params.imatrix`` (llama.cpp's own quantizer with this matrix). The
        arrays it points into are kept alive on the returned object."""
        entries = (llama_cpp.llama_model_imatrix_data * (len(self.sums) + 1))()
        entries.values = []
        for entry, name in zip(entries, sorted(self.sums), strict=False):
            values = np.ascontiguousarray(self.importance(name).numpy(), dtype=np.float32)
            entries.values.append(values)
            entry.name, entry.size = name.encode(), values.size
            entry.data = values.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
        return entries

    def save(self, path: Path) -> Path:
        """Write llama.cpp's GGUF imatrix format (legacy ``.dat`` when ``path`` ends in ``.dat``)."""
        path = Path(path)
        if path.suffix == ".dat":
            self._save_dat(path)
            return path
        writer = GGUFWriter(path, arch="")
        writer.kv_data[0].clear()  # an imatrix file has no general.architecture
        writer.add_string("general.type", "imatrix")
        writer.add_array("imatrix.datasets", list(self.datasets) or [""])
        writer.add_uint32("imatrix.chunk_count", self.chunk_count)
        writer.add_uint32("imatrix.chunk_size", self.chunk_size)
        for name in sorted(self.sums):
            writer.add_tensor(f"{name}.in_sum2", self.sums[name].to(torch.float32).numpy().reshape(1, -1))
            writer.add_tensor(f"{name}.counts", np.array([[float(self.counts[name])]], dtype=np.float32))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        return path

    def _save_dat(self, path: Path) -> None:
        chunk = max(self.chunk_size, 1)
        parts = [struct.pack("<i", len(self.sums))]
        for name in sorted(self.sums):
            ncall = max(1, (self.counts[name] + chunk - 1) // chunk)
            values = (self.sums[name] / max(self.counts[name], 1) * ncall).to(torch.float32).numpy()
            encoded = name.encode()
            parts += [struct.pack("<i", len(encoded)), encoded, struct.pack("<ii", ncall, values.size),
                      values.astype("<f4").tobytes()]
        dataset = (self.datasets[-1] if self.datasets else "").encode()
        parts += [struct.pack("<i", self.chunk_count), struct.pack("<i", len(dataset)), dataset]
        path.write_bytes(b"".join(parts))

    @classmethod
    def load(cls, path: Path) -> ImportanceMatrix:
        """Read an imatrix file written by llama.cpp (GGUF or legacy ``.dat``) or by :meth:`save`.

        Raises:
            ExportError: the file is missing or is not an imatrix.
        """
        path = Path(path)
        if not path.is_file():
            raise ExportError(f"imatrix: no file {path}")
        with open(path, "rb") as f:
            magic = f.read(4)
        try:
            return cls._load_gguf(path) if magic == b"GGUF" else cls._load_dat(path)
        except (ValueError, struct.error, UnicodeDecodeError, KeyError) as exc:
            raise ExportError(f"imatrix: {path} is not a llama.cpp importance matrix ({exc})") from exc

    @classmethod
    def _load_gguf(cls, path: Path) -> ImportanceMatrix:
        reader = GGUFReader(path)
        kind = reader.get_field("general.type")
        if kind is None or kind.contents() != "imatrix":
            raise ValueError("general.type is not 'imatrix'")
        tensors = {t.name: np.asarray(t.data, dtype=np.float64) for t in reader.tensors}
        out = cls()
        for key in tensors:
            if not key.endswith(".in_sum2"):
                continue
            name = key[: -len(".in_sum2")]
            counts = tensors[f"{name}.counts"].reshape(-1)
            values = tensors[key].reshape(counts.size, -1)
            # several matrices (experts) keep one count each: fold them into one mean per column
            mean = (values / np.where(counts > 0, counts, 1)[:, None]).mean(axis=0)
            out.counts[name] = int(counts.max())
            out.sums[name] = torch.from_numpy(mean * out.counts[name])
        for key, attr in (("imatrix.chunk_count", "chunk_count"), ("imatrix.chunk_size", "chunk_size")):
            value = reader.get_field(key)
            if value is not None:
                setattr(out, attr, int(value.contents()))
        datasets = reader.get_field("imatrix.datasets")
        out.datasets = list(datasets.contents()) if datasets is not None else []
        return out

    @classmethod
    def _load_dat(cls, path: Path) -> ImportanceMatrix:
        data = path.read_bytes()
        (n_entries,) = struct.unpack_from("<i", data, 0)
        if n_entries < 1:
            raise ValueError("no entries")
        offset = 4
        out = cls()
        for _ in range(n_entries):
            (length,) = struct.unpack_from("<i", data, offset)
            name = data[offset + 4 : offset + 4 + length].decode()
            offset += 4 + length
            ncall, nval = struct.unpack_from("<ii", data, offset)
            offset += 8
            values = np.frombuffer(data, dtype="<f4", count=nval, offset=offset).astype(np.float64)
            offset += 4 * nval
            # the file holds mean * ncall: with ncall as the count, sums / counts is the mean
            out.counts[name] = max(ncall, 1)
            out.sums[name] = torch.from_numpy(values)
        if offset + 4 <= len(data):
            (out.chunk_count,) = struct.unpack_from("<i", data, offset)
            offset += 4
            if offset + 4 <= len(data):
                (length,) = struct.unpack_from("<i", data, offset)
                out.datasets = [data[offset + 4 : offset + 4 + length].decode()]
        return out


@contextmanager
def plain_forwards(model: nn.Module) -> Iterator[None]:
    """The model runs Hugging Face's own forwards inside the block, its adapter's kernel patches put back
    after. The fused forwards read the linear layers' weights themselves, so hooks on those layers would
    never fire while they are in place."""
    adapter = adapter_for_model_type(model.config.model_type)
    unpatch = getattr(adapter, "unpatch", None)
    restored = unpatch(model) if unpatch is not None else 0
    try:
        yield
    finally:
        if restored:
            adapter.patch(model, get_op)


def collect(
    model: nn.Module,
    rows: Iterable[Sequence[int]],
    gguf_name: Callable[[str], str | None],
    chunk_size: int = 512,
    max_chunks: int | None = None,
    dataset: str = "",
) -> ImportanceMatrix:
    """Run ``model`` over calibration tokens and record the squared inputs of every linear layer.

    Args:
        model: a causal LM, plain or peft (adapters active: the merged model's activations), patched
            or not (:func:`plain_forwards`).
        rows: token-id sequences; they are concatenated and cut into chunks of ``chunk_size``.
        gguf_name: a weight's checkpoint name (``model.layers.0.mlp.down_proj.weight``) -> its GGUF
            name, or ``None`` for weights not in the GGUF file.
        chunk_size: tokens per forward pass.
        max_chunks: stop after this many chunks (``None``: all the text).
        dataset: recorded in the file as the calibration source.

    Returns:
        The importance matrix, keyed by GGUF names.

    Raises:
        ExportError: the rows hold no tokens.
    """
    stream: list[int] = []
    limit = None if max_chunks is None else max_chunks * chunk_size
    for row in rows:
        stream.extend(int(t) for t in row)
        if limit is not None and len(stream) >= limit:
            break
    if not stream:
        raise ExportError("imatrix: the calibration data holds no tokens")
    chunks = [stream[i : i + chunk_size] for i in range(0, len(stream), chunk_size)][:max_chunks]
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    result = ImportanceMatrix(chunk_size=chunk_size, datasets=[dataset] if dataset else [])
    handles = []

    def hook(name: str):
        def record(_module: nn.Module, inputs: tuple[Any, ...]) -> None:
            x = inputs[0].detach()
            x = x.reshape(-1, x.shape[-1]).to(torch.float64)
            result.sums[name] = result.sums.get(name, 0) + (x * x).sum(dim=0).cpu()
            result.counts[name] = result.counts.get(name, 0) + x.shape[0]

        return record

    for module_name, module in base.named_modules():
        if not isinstance(module, nn.Linear):
            continue
        layer = checkpoint_layer_name(module_name)
        name = gguf_name(f"{layer}.weight") if layer is not None else None
        if name is not None:
            handles.append(module.register_forward_pre_hook(hook(name)))
    device = next(model.parameters()).device
    try:
        with torch.no_grad(), plain_forwards(base):
            for chunk in chunks:
                model(input_ids=torch.tensor([chunk], device=device), use_cache=False)
                result.chunk_count += 1
    finally:
        for handle in handles:
            handle.remove()
    return result
