"""The model-adapter object every family file fills with data (see :class:`DecoderAdapter`)."""

from __future__ import annotations

from contextlib import AbstractContextManager
from contextlib import nullcontext
from dataclasses import dataclass
from dataclasses import replace
from typing import Any

from ftengine.plugins.models import _moe
from ftengine.plugins.models._gguf import GGUFLayout
from ftengine.plugins.models._patching import GetOp
from ftengine.plugins.models._patching import PatchTable
from ftengine.plugins.models._patching import patch_model
from ftengine.plugins.models._patching import routing_report
from ftengine.plugins.models._patching import unpatch_model
from ftengine.plugins.models._vision import VisionSpec

ALL_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class DecoderAdapter:
    """A :class:`ftengine.core.types.ModelAdapter` for a decoder-only family, described by data.

    Attributes:
        name, model_types, default_target_modules, default_chat_template: as in the protocol.
        table: the Hugging Face classes :meth:`patch` replaces forwards on.
        gguf: the family's llama.cpp layout (:class:`GGUFLayout`), or ``None`` when it cannot be
            exported to GGUF.
        vision: the towers of a vision-language family (:class:`VisionSpec`; ``None`` for a text-only
            one); with it, :meth:`patch` patches the language tower, the top-level loss and what the spec's
            ``tower`` table names in the vision tower.

    Example::

        ADAPTER = DecoderAdapter(
            name="myarch", model_types=("myarch",),
            table=PatchTable(norms=("MyRMSNorm",), attentions=("MyAttention",), mlps=("MyMLP",),
                             causal_lms=("MyForCausalLM",)),
            default_chat_template="chatml", gguf=GGUFLayout(architecture="llama", permute_qk=True))

    .. versionadded:: 0.1
    """

    name: str
    model_types: tuple[str, ...]
    table: PatchTable
    default_chat_template: str | None
    gguf: GGUFLayout | None = None
    default_target_modules: tuple[str, ...] = ALL_LINEAR
    vision: VisionSpec | None = None

    def patch(self, model: Any, get_op: GetOp) -> list[str]:
        """Swap the model's norm, attention, MLP and loss forwards for kernel ops.

        Args:
            model: a Hugging Face model of this family (LoRA may be attached later).
            get_op: the core's :func:`ftengine.core.kernels.get_op`.

        Returns:
            one line per kind of module patched, naming the op and its backend.
        """
        if self.vision is None or not _has_module(model, self.vision.language):
            return patch_model(model, get_op, self.table)
        # The towers are patched apart: the vision tower may share a norm class with the text (Qwen2.5-VL) and
        # gets only what its own table names.
        lines = patch_model(self.vision.language_tower(model), get_op, replace(self.table, causal_lms=()))
        if self.vision.tower is not None:
            tower = model.get_submodule(self.vision.vision)
            lines += [f"vision tower: {line}" for line in patch_model(tower, get_op, self.vision.tower)]
        only_loss = PatchTable(norms=(), attentions=(), mlps=(), causal_lms=self.table.causal_lms,
                               final_softcap=self.table.final_softcap, decoder=self.table.decoder)
        return lines + patch_model(model, get_op, only_loss)

    def quantized_load(self, get_op: GetOp) -> AbstractContextManager[None]:
        """Entered around a ``load_in_4bit`` load: a mixture-of-experts family stores its fused 3-D experts NF4
        as each layer's arrive (bitsandbytes leaves them 16-bit); nothing for a dense one."""
        return _moe.experts_quantized_on_arrival(get_op) if self.table.moes else nullcontext()

    def unpatch(self, model: Any) -> int:
        """Undo :meth:`patch`; returns the number of modules restored."""
        return unpatch_model(model)

    def routes(self, model: Any) -> list[str]:
        """How the patched projections run now (fused op or peft's path, with the reason)."""
        return routing_report(model)


def _has_module(model: Any, name: str) -> bool:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    try:
        base.get_submodule(name)
    except AttributeError:
        return False
    return True
