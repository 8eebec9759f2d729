"""The vision side of a vision-language model in llama.cpp's ``clip`` layout (the ``mmproj`` GGUF file).

llama.cpp runs a vision-language model as two files: the language model (the usual GGUF, see
:mod:`ftengine.plugins.models._gguf`) and a projector file with ``general.architecture = "clip"``
that holds the vision tower and the projector into the text's embedding space. Its loader
(``tools/mtmd/clip.cpp``) picks the graph from ``clip.projector_type`` and reads the tower's sizes
from ``clip.vision.*`` keys. Tensor names come from gguf-py's ``TensorNameMap`` for its ``MMPROJ``
architecture (``v.blk.N.attn_q``, ``mm.0``, ...), after a family's renames bring transformers' module
paths to the checkpoint names that map knows.

A family describes its file with an :class:`MmprojLayout` (data plus two small functions), set as
its ``GGUFLayout.mmproj``.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

_LAYER = re.compile(r"\.(blocks|layers)\.(\d+)\.")

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
"""The image normalization of Qwen2-VL's and Qwen2.5-VL's image processors (OpenAI CLIP's)."""


_MAP_BLOCKS = 16
"""Blocks of the name map: vision blocks map through block 0; the map's other numbered entries are the
projector's few layers (``mm.0``, ``mm.2``)."""


@functools.cache
def _clip_name_map() -> Any:
    """gguf-py's tensor-name map of llama.cpp's ``clip`` (mmproj) architecture."""
    import gguf  # only exports need it

    return gguf.get_tensor_name_map(gguf.MODEL_ARCH.MMPROJ, _MAP_BLOCKS)


def split_fused_qkv(name: str, tensor: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
    """A fused ``attn_qkv`` weight or bias ``(3C, ...)`` as llama.cpp's separate ``attn_q``, ``attn_k``
    and ``attn_v`` (rows ``[0, C)``, ``[C, 2C)``, ``[2C, 3C)``); other tensors pass unchanged."""
    if ".attn_qkv." not in name:
        return [(name, tensor)]
    q, k, v = tensor.chunk(3, dim=0)
    return [(name.replace(".attn_qkv.", f".attn_{part}."), value) for part, value in (("q", q), ("k", k), ("v", v))]


def split_temporal_patch(name: str, tensor: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
    """A 3-D patch-embedding convolution ``(C, 3, T=2, P, P)`` as two 2-D ones, one per frame.

    A Conv3d whose temporal kernel spans the whole (two-frame) input is the sum of a Conv2d per
    frame: ``out = W[:, :, 0] * frame0 + W[:, :, 1] * frame1``. llama.cpp keeps the halves as
    ``v.patch_embd.weight`` and ``v.patch_embd.weight.1`` ``(C, 3, P, P)`` and feeds a still image
    to both (the image processor repeats it along time).
    """
    if name != "v.patch_embd.weight" or tensor.dim() != 5:
        return [(name, tensor)]
    if tensor.shape[2] != 2:
        raise ValueError(f"llama.cpp's clip loader reads a temporal patch of 2 frames; this model's patch "
                         f"embedding spans {tensor.shape[2]}")
    return [(name, tensor[:, :, 0].contiguous()), (name + ".1", tensor[:, :, 1].contiguous())]


@dataclass(frozen=True)
class MmprojLayout:
    """How a vision-language family's vision tower and projector are written as llama.cpp's mmproj file.

    Attributes:
        projector_type: ``clip.projector_type`` (llama.cpp's graph: ``qwen2vl_merger``, ``gemma3``, ...).
        renames: ``(prefix, replacement)``: a transformers state-dict prefix of the vision side and the
            checkpoint prefix gguf-py's map knows it by; tensors under none of these prefixes are not
            in the mmproj file (they belong to the language model).
        hparams: the family's keys from the model's config: ``hparams(config) -> {key: value}`` with
            full key names (``clip.vision.embedding_length``, ...), the required ones included.
        image_mean / image_std: the normalization the family's image processors use, written when the
            export has no image processor to read them from.
        split: ``split(gguf_name, tensor) -> [(gguf_name, tensor), ...]``: a mapped tensor as the
            tensors llama.cpp keeps apart (fused qkv, a 3-D patch embedding).
        norm_shift: GGUF names of norm weights stored as ``1 + w`` (Gemma's RMSNorm in the projector).
        keep_f32: GGUF names written in F32 whatever the file type (position embeddings).
        skip: regular expressions of vision-side transformers names the projector does not use.

    .. versionadded:: 0.1
    """

    projector_type: str
    renames: tuple[tuple[str, str], ...]
    hparams: Callable[[Any], dict[str, Any]]
    image_mean: tuple[float, ...]
    image_std: tuple[float, ...]
    split: Callable[[str, torch.Tensor], list[tuple[str, torch.Tensor]]] = split_fused_qkv
    norm_shift: tuple[str, ...] = ()
    keep_f32: tuple[str, ...] = ()
    skip: tuple[str, ...] = ()

    def tensor_name(self, hf_name: str) -> str | None:
        """The mmproj name of a transformers state-dict name; ``None`` for the language model's tensors.

        Raises:
            KeyError: a vision-side tensor gguf-py's clip map does not know.
        """
        if any(re.search(pattern, hf_name) for pattern in self.skip):
            return None
        for prefix, replacement in self.renames:
            if hf_name.startswith(prefix):
                name = replacement + hf_name[len(prefix):]
                break
        else:
            return None
        match = _LAYER.search(name)
        block = match.group(2) if match else None
        if match:
            name = f"{name[: match.start()]}.{match.group(1)}.0.{name[match.end():]}"
        if name.endswith("_weight"):  # Gemma 3's projector keeps a bare parameter: ``mm_input_projection_weight``
            name = name[: -len("_weight")] + ".weight"
        mapped = _clip_name_map().get_name(name, try_suffixes=(".weight", ".bias"))
        if mapped is None:
            raise KeyError(f"no mmproj name for tensor {hf_name!r} (llama.cpp projector {self.projector_type})")
        if block is not None:
            mapped = mapped.replace(".blk.0.", f".blk.{block}.", 1)
        return mapped

    def tensors(self, hf_name: str, tensor: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
        """The mmproj tensors ``(gguf_name, tensor)`` of one transformers tensor (``[]`` for the language model's)."""
        name = self.tensor_name(hf_name)
        if name is None:
            return []
        if name in self.norm_shift:
            tensor = tensor + 1.0
        return self.split(name, tensor)


ACTIVATION_KEYS = {"quick_gelu": {}, "gelu": {"clip.use_gelu": True}, "gelu_pytorch_tanh": {"clip.use_gelu": True},
                   "silu": {"clip.use_silu": True}}
"""The vision MLP's activation as llama.cpp's flags: none set means quick GELU, ``use_gelu`` its tanh GELU."""


def tower_hparams(config: Any, *, width: int, feed_forward: int, blocks: int, heads: int, eps: float,
                  image_size: int, patch_size: int, activation: str) -> dict[str, Any]:
    """The ``clip.*`` keys every vision tower has (clip.cpp requires all of them but the activation flag).

    Args:
        config: the vision-language config (``clip.vision.projection_dim`` is its text width).
        activation: the tower's MLP activation, a transformers ``hidden_act`` name.

    Raises:
        ValueError: an activation llama.cpp's vision MLP has no flag for.
    """
    if activation not in ACTIVATION_KEYS:
        raise ValueError(f"llama.cpp's vision MLP has no {activation!r} activation (it has: "
                         f"{', '.join(ACTIVATION_KEYS)})")
    text = getattr(config, "text_config", None) or config
    return {
        "clip.vision.projection_dim": int(text.hidden_size),
        "clip.vision.image_size": int(image_size),
        "clip.vision.patch_size": int(patch_size),
        "clip.vision.embedding_length": int(width),
        "clip.vision.feed_forward_length": int(feed_forward),
        "clip.vision.block_count": int(blocks),
        "clip.vision.attention.head_count": int(heads),
        "clip.vision.attention.layer_norm_epsilon": float(eps),
        **ACTIVATION_KEYS[activation],
    }
