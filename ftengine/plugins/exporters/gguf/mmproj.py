"""The ``mmproj`` file of a vision-language GGUF export: the vision tower and projector for llama.cpp's
``clip`` loader (``llama-mtmd-cli -m model.gguf --mmproj mmproj-<name>-f16.gguf``).

The family's :class:`~ftengine.plugins.models._mmproj.MmprojLayout` (its ``GGUFLayout.mmproj``) names
the tensors and the ``clip.*`` keys. The tensors arrive during the language model's own pass over the
merged weights (:func:`ftengine.plugins.exporters.gguf.writer.write_ggufs`' ``sink``), so a LoRA on the
vision tower is merged once. Like llama.cpp's converter, matrices and convolutions are written in F16,
vectors (norms, biases) and the layout's ``keep_f32`` tensors in F32.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch
from gguf import GGUFWriter
from gguf import LlamaFileType

from ftengine.core.errors import ExportError
from ftengine.core.plugins import adapter_for_model_type
from ftengine.core.plugins import get_registry
from ftengine.plugins.exporters.gguf.writer import add_value
from ftengine.plugins.exporters.gguf.writer import metadata_text

ARCHITECTURE = "clip"
"""``general.architecture`` of every mmproj file (gguf-py's ``MODEL_ARCH.MMPROJ``)."""


def is_vision_language(config: Any) -> bool:
    """Whether a Hugging Face config is a vision-language model's (it has a ``vision_config``)."""
    return getattr(config, "vision_config", None) is not None


def supported_families() -> list[str]:
    """The model adapters (families) that describe an mmproj layout."""
    return sorted(name for name, a in get_registry("models").items()
                  if getattr(getattr(a, "gguf", None), "mmproj", None) is not None)


def mmproj_layout(config: Any) -> Any:
    """The mmproj layout of a vision-language config's family.

    Raises:
        ExportError: the family has no mmproj layout; the message names the model type and the supported ones.
    """
    layout = getattr(getattr(adapter_for_model_type(config.model_type), "gguf", None), "mmproj", None)
    if layout is None:
        raise ExportError(f"cannot export the {config.model_type!r} vision-language model to GGUF: llama.cpp's "
                          f"mmproj (vision tower + projector) file is written for "
                          f"{', '.join(supported_families()) or '(none)'} only")
    return layout


def tower_keys(layout: Any, config: Any) -> dict[str, Any]:
    """The family's ``clip.*`` keys for this model.

    Raises:
        ExportError: a tower llama.cpp's graph cannot run (an activation it lacks, an irregular window pattern).
    """
    try:
        return layout.hparams(config)
    except ValueError as exc:
        raise ExportError(f"cannot export the {config.model_type!r} vision tower to llama.cpp's mmproj: "
                          f"{exc}") from None


def file_name(config: Any, name: str | None = None) -> str:
    """``mmproj-<name>-f16.gguf``, ``<name>`` the model's directory or hub name in file-name characters."""
    base = name or Path(str(getattr(config, "_name_or_path", "") or "model")).name
    return f"mmproj-{re.sub(r'[^A-Za-z0-9._-]+', '_', base).strip('._') or 'model'}-f16.gguf"


def image_normalization(layout: Any, processor: Any) -> tuple[list[float], list[float], str | None]:
    """``(mean, std, note)``: the image processor's normalization, else the family's (with a note saying so)."""
    image_processor = getattr(processor, "image_processor", None)
    mean = getattr(image_processor, "image_mean", None)
    std = getattr(image_processor, "image_std", None)
    if mean is not None and std is not None:
        return [float(v) for v in mean], [float(v) for v in std], None
    return (list(layout.image_mean), list(layout.image_std),
            f"mmproj: no image processor given; wrote {layout.projector_type}'s usual image mean/std")


class MmprojWriter:
    """Collects the vision-side tensors of one pass over the merged weights, then writes the mmproj file.

    Args:
        model: the vision-language model (its config describes the tower).
        processor: its processor (image mean and std) or the bare tokenizer.
        path: the mmproj file to write (``.partial`` first, renamed when complete).
        name: ``general.name`` (default: the model's directory or hub name).

    Raises:
        ExportError: the family has no mmproj layout, or its tower is one llama.cpp's graph cannot run;
            raised here, before anything is written.
    """

    def __init__(self, model: Any, processor: Any, path: Path, name: str | None = None):
        self.config = model.config
        self.layout = mmproj_layout(self.config)
        self.hparams = tower_keys(self.layout, self.config)
        self.mean, self.std, self.note = image_normalization(self.layout, processor)
        self.path = Path(path)
        self.name = name
        self.arrays: list[tuple[str, np.ndarray]] = []

    def __call__(self, hf_name: str, tensor: torch.Tensor) -> None:
        """Keep the mmproj tensors of one merged Hugging Face tensor (nothing for the language model's)."""
        try:
            parts = self.layout.tensors(hf_name, tensor)
        except (KeyError, ValueError) as exc:
            raise ExportError(f"mmproj: {exc.args[0]}") from None
        for gguf_name, value in parts:
            f32 = value.dim() <= 1 or gguf_name in self.layout.keep_f32
            self.arrays.append((gguf_name, value.float().numpy().astype(np.float32 if f32 else np.float16)))

    def write(self) -> list[str]:
        """Write the file; returns its summary line (and a note when the image normalization was assumed)."""
        if not self.arrays:
            raise ExportError(f"mmproj: the model has no {self.layout.projector_type} vision tensors to write")
        partial = self.path.with_name(self.path.name + ".partial")
        writer = GGUFWriter(partial, ARCHITECTURE)
        try:
            writer.add_type("mmproj")
            writer.add_name(metadata_text(self.name or Path(str(getattr(self.config, "_name_or_path", "") or
                                                                "model")).name))
            writer.add_file_type(int(LlamaFileType.MOSTLY_F16))
            writer.add_bool("clip.has_vision_encoder", True)
            writer.add_string("clip.projector_type", self.layout.projector_type)
            for key, value in self.hparams.items():
                add_value(writer, key, value)
            writer.add_array("clip.vision.image_mean", self.mean)
            writer.add_array("clip.vision.image_std", self.std)
            for gguf_name, array in self.arrays:
                writer.add_tensor(gguf_name, array)
            writer.write_header_to_file()
            writer.write_kv_data_to_file()
            writer.write_tensors_to_file()
            writer.close()
            os.replace(partial, self.path)
        finally:
            partial.unlink(missing_ok=True)
        counts: dict[str, int] = {}
        for _, array in self.arrays:
            kind = "F16" if array.dtype == np.float16 else "F32"
            counts[kind] = counts.get(kind, 0) + 1
        types = ", ".join(f"{k} x{v}" for k, v in sorted(counts.items()))
        line = (f"{self.path.name}: {len(self.arrays)} tensors ({types}), {self.path.stat().st_size / 2**20:.1f} MiB, "
                f"llama.cpp projector {self.layout.projector_type}")
        return [line] + ([f"note: {self.note}"] if self.note else [])
