"""Unsloth's names over ftengine, for notebooks written against Unsloth: change the import, keep the rest::

    from ftengine.compat import FastLanguageModel, is_bf16_supported
    from ftengine.compat.chat_templates import get_chat_template, train_on_responses_only
    from trl import SFTTrainer  # after the ftengine.compat import: ftengine builds the trainer

Every name calls ftengine's Python API; nothing here trains, formats or exports on its own.
"""

from ftengine.compat.fast_inference import SamplingParams
from ftengine.compat.models import FastLanguageModel
from ftengine.compat.models import FastModel
from ftengine.compat.models import FastVisionModel
from ftengine.compat.models import is_bf16_supported
from ftengine.compat.trainers import UnslothVisionDataCollator
from ftengine.compat.trainers import install

__all__ = ["FastLanguageModel", "FastModel", "FastVisionModel", "SamplingParams", "UnslothVisionDataCollator",
           "is_bf16_supported", "PatchDPOTrainer", "PatchFastRL"]


def PatchDPOTrainer() -> None:  # noqa: N802 (Unsloth's name)
    """Route ``trl.DPOTrainer`` through ftengine (already done by importing :mod:`ftengine.compat`)."""
    install()


def PatchFastRL(algorithm: str | None = None, FastLanguageModel: object = None) -> None:  # noqa: N802, N803
    """Route ``trl.GRPOTrainer`` (and the other trainers) through ftengine, as Unsloth's ``PatchFastRL("GRPO",
    FastLanguageModel)`` does (already done by importing :mod:`ftengine.compat`; the arguments are Unsloth's)."""
    install()


install()
