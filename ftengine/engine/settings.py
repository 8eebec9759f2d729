"""How a model was loaded, kept for the stages and the Python API calls that come after."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass
class ModelSettings:
    """What later stages need to know of how a model was loaded.

    The pipeline passes it from stage to stage (:class:`LoadedModel`, then the trainer's
    :class:`~ftengine.core.types.TrainRequest`); the Python API, which hands only the model object
    from call to call, keeps it on the model as the one attribute :data:`SETTINGS_ATTR`.

    Attributes:
        max_seq_length: ``model.max_seq_length``: truncation and packing length, the default of
            ``ftengine.load_dataset`` and the trainers' ``max_length``.
        attn_implementation: ``model.attn_implementation`` as requested (``auto`` is resolved per dataset).
        offload_embedding: ``model.offload_embedding``: the input embedding moves to CPU memory once frozen.
    """

    max_seq_length: int = 2048
    attn_implementation: str = "auto"
    offload_embedding: bool = False


SETTINGS_ATTR = "ftengine_settings"


def remember_settings(model: Any, settings: ModelSettings) -> None:
    """Keep ``settings`` on ``model`` for the Python API's later calls."""
    setattr(model, SETTINGS_ATTR, settings)


def settings_of(model: Any) -> ModelSettings:
    """The settings :func:`ftengine.engine.pipeline.load` left on ``model`` (through a peft wrapper too);
    defaults for a model loaded elsewhere."""
    return getattr(model, SETTINGS_ATTR, None) or ModelSettings()
