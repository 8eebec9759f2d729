"""The model-adapter object every family file fills with data (see :class:`DecoderAdapter`)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from ftengine.plugins.models import _gguf
from ftengine.plugins.models._patching import GetOp
from ftengine.plugins.models._patching import PatchTable
from ftengine.plugins.models._patching import patch_model
from ftengine.plugins.models._patching import routing_report
from ftengine.plugins.models._patching import unpatch_model

ALL_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class DecoderAdapter:
    """A :class:`ftengine.core.types.ModelAdapter` for a decoder-only family, described by data.

    Attributes:
        name, model_types, default_target_modules, default_chat_template, gguf_architecture:
            as in the protocol.
        table: the Hugging Face classes :func:`patch` replaces forwards on.
        gguf_permute_qk: regroup q/k rows to llama.cpp's rotary order (Llama, Mistral).
        gguf_norm_shift: added to every ``*norm.weight`` on export (Gemma stores ``1 + w``).
        gguf_skip: regular expressions of Hugging Face tensors not exported.
        gguf_renames: ``(prefix, replacement)`` pairs applied before name mapping (multimodal wrappers).
        gguf_extra_metadata: the family's own keys from the config, beyond :func:`_gguf.rope_metadata`.
    """

    name: str
    model_types: tuple[str, ...]
    table: PatchTable
    default_chat_template: str | None
    gguf_architecture: str | None
    default_target_modules: tuple[str, ...] = ALL_LINEAR
    gguf_permute_qk: bool = False
    gguf_norm_shift: float = 0.0
    gguf_skip: tuple[str, ...] = ()
    gguf_renames: tuple[tuple[str, str], ...] = ()
    gguf_extra_metadata: Callable[[Any], dict[str, Any]] | None = None

    def patch(self, model: Any, get_op: GetOp) -> list[str]:
        """Swap the model's norm, attention, MLP and loss forwards for kernel ops.

        Args:
            model: a Hugging Face model of this family (LoRA may be attached later).
            get_op: the core's :func:`ftengine.core.kernels.get_op`.

        Returns:
            one line per kind of module patched, naming the op and its backend.
        """
        return patch_model(model, get_op, self.table)

    def unpatch(self, model: Any) -> int:
        """Undo :meth:`patch`; returns the number of modules restored."""
        return unpatch_model(model)

    def routes(self, model: Any) -> list[str]:
        """How the patched projections run now (fused op or peft's path, with the reason)."""
        return routing_report(model)

    def gguf_tensor_name(self, hf_name: str) -> str | None:
        """llama.cpp's name for a Hugging Face tensor name (``None``: not exported)."""
        if self.gguf_architecture is None:
            return None
        return _gguf.tensor_name(self.gguf_architecture, hf_name, self.gguf_skip, self.gguf_renames)

    def gguf_tensor(self, hf_name: str, tensor: torch.Tensor, config: Any) -> torch.Tensor:
        """The tensor in llama.cpp's layout: q/k rows regrouped (Llama), norms shifted (Gemma)."""
        text = getattr(config, "text_config", None) or config
        if self.gguf_permute_qk and hf_name.endswith(("q_proj.weight", "q_proj.bias")):
            return _gguf.permute_rotary_rows(tensor, text.num_attention_heads)
        if self.gguf_permute_qk and hf_name.endswith(("k_proj.weight", "k_proj.bias")):
            return _gguf.permute_rotary_rows(tensor, text.num_key_value_heads or text.num_attention_heads)
        if self.gguf_norm_shift and hf_name.endswith("norm.weight"):
            return tensor + self.gguf_norm_shift
        return tensor

    def gguf_metadata(self, config: Any) -> dict[str, Any]:
        """Architecture keys without the ``{arch}.`` prefix: rope settings and the family's own."""
        text = getattr(config, "text_config", None) or config
        meta = _gguf.rope_metadata(text)
        if self.gguf_extra_metadata is not None:
            meta.update(self.gguf_extra_metadata(text))
        return meta

    def gguf_extra_tensors(self, config: Any) -> dict[str, torch.Tensor]:
        """Tensors llama.cpp needs that have no Hugging Face counterpart (Llama 3.1's ``rope_freqs.weight``)."""
        text = getattr(config, "text_config", None) or config
        factors = _gguf.llama3_rope_factors(text) if self.gguf_architecture == "llama" else None
        return {} if factors is None else {"rope_freqs.weight": factors}
