"""What a vision-language family adds to its decoder adapter: where its towers live and which
modules train, stay 16-bit and go to the ``mmproj`` GGUF.

A :class:`VisionSpec` is data, like the patch tables: module-name prefixes of the language tower,
the vision tower and the projector, and the short names of their attention and MLP projections.
The engine reads it through the adapter's optional ``vision`` attribute (``lora.finetune_*`` keys,
QLoRA's skipped modules); the patching applies the adapter's table to the language tower alone,
and to the vision tower only what ``VisionSpec.tower`` names (nothing by default: Hugging Face's
own code).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from ftengine.plugins.models._patching import PatchTable


@dataclass(frozen=True)
class VisionSpec:
    """A vision-language family's module layout (names as in the model's ``named_modules``).

    Attributes:
        language: prefix of the language tower (``model.language_model``).
        vision: prefix of the vision tower (``model.visual``, ``model.vision_tower``).
        projector: prefix of the vision-to-text projector (``model.visual.merger``); kept 16-bit.
        language_attention / language_mlp: short names of the language tower's projections.
        vision_attention / vision_mlp: short names of the vision tower's projections (with their parent's
            name where a short name alone is ambiguous: Qwen's ``attn.proj`` against its patch embedding's
            ``proj`` convolution).
        keep_16bit: further prefixes QLoRA leaves unquantized (besides the vision tower and projector).
        max_images_per_turn: the most images one message may hold (Llama 3.2 Vision: one), or ``None``.
        tower: the vision tower's modules to patch onto the kernel ops (its RMSNorms and gated MLPs; a
            :class:`PatchTable` without ``causal_lms``), or ``None``: the tower keeps Hugging Face's forwards.
    """

    language: str
    vision: str
    projector: str
    language_attention: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj")
    language_mlp: tuple[str, ...] = ("gate_proj", "up_proj", "down_proj")
    vision_attention: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "out_proj")
    vision_mlp: tuple[str, ...] = ("fc1", "fc2")
    keep_16bit: tuple[str, ...] = ()
    max_images_per_turn: int | None = None
    tower: PatchTable | None = None

    def target_modules(self, vision_layers: bool = True, language_layers: bool = True, attention: bool = True,
                       mlp: bool = True) -> str | None:
        """A peft ``target_modules`` regular expression for the ``lora.finetune_*`` switches.

        The projector is never a LoRA target (it trains only through ``modules_to_save``).

        Returns:
            the expression, or ``None`` when the switches select nothing.
        """
        towers = []
        for on, prefix, attn, ffn in ((language_layers, self.language, self.language_attention, self.language_mlp),
                                      (vision_layers, self.vision, self.vision_attention, self.vision_mlp)):
            names = (attn if attention else ()) + (ffn if mlp else ())
            if on and names:
                alternatives = "|".join(map(re.escape, names))
                towers.append(rf"{re.escape(prefix)}\.{_not_projector(self, prefix)}.*\.({alternatives})")
        if not towers:
            return None
        return "|".join(f"(?:.*{t})" for t in towers)

    def unquantized(self) -> tuple[str, ...]:
        """Module prefixes bitsandbytes must leave in 16-bit (its ``llm_int8_skip_modules``)."""
        return (self.vision, self.projector, "lm_head") + self.keep_16bit

    def language_tower(self, model: Any) -> Any:
        """The language tower module of ``model`` (a peft wrapper's base model included)."""
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        return base.get_submodule(self.language)


def _not_projector(spec: VisionSpec, prefix: str) -> str:
    """A negative lookahead for the projector's path below ``prefix`` when it sits inside that tower
    (Qwen's merger), so the projector's own linears are never LoRA targets; else nothing."""
    if spec.projector.startswith(prefix + "."):
        return rf"(?!.*{re.escape(spec.projector[len(prefix) + 1:])}\.)"
    return ""

