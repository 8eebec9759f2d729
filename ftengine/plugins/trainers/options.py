"""Each trainer's ``training.trainer_options``, with trl's names, defaults and meanings.

The core validates ``training.trainer_options`` (or the extra keyword arguments of
``ftengine.train``) against these; unknown keys get a "did you mean" with the key path.
"""

from __future__ import annotations

from typing import Any
from typing import Literal

from pydantic import BaseModel
from pydantic import ConfigDict
from pydantic import Field
from pydantic import field_validator

DPO_LOSS_TYPES = Literal["sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard", "aot",
                         "aot_unpaired", "apo_zero", "apo_down", "discopop", "sft", "sigmoid_norm"]


class Options(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class DPOOptions(Options):
    beta: float = Field(0.1, gt=0, description="Strength of the implicit KL penalty to the reference (IPO: its "
                                               "regularization parameter).")
    loss_type: DPO_LOSS_TYPES | list[DPO_LOSS_TYPES] = Field(
        "sigmoid", description="trl's DPO loss: sigmoid (DPO), ipo (IPO), hinge (SLiC), robust, bco_pair, "
                               "sppo_hard, nca_pair, aot, apo_zero, discopop, sigmoid_norm (length-normalized), "
                               "sft...; a list combines several (weights: loss_weights).")
    loss_weights: list[float] | None = Field(None, description="Weights of the losses of a loss_type list.")
    label_smoothing: float = Field(0.0, ge=0, lt=0.5, description="Robust DPO / cDPO: assumed label noise.")


class ORPOOptions(Options):
    beta: float = Field(0.1, gt=0, description="Weight of the odds-ratio term added to the chosen answer's NLL "
                                               "(the paper's lambda).")


class KTOOptions(Options):
    beta: float = Field(0.1, gt=0, description="Strength of the implicit KL penalty to the reference.")
    desirable_weight: float = Field(1.0, gt=0, description="Loss weight of desirable (label: true) completions.")
    undesirable_weight: float = Field(1.0, gt=0, description="Loss weight of undesirable (label: false) "
                                                            "completions.")
    loss_type: Literal["kto", "apo_zero_unpaired"] = Field("kto", description="trl's KTO loss.")


class GRPOOptions(Options):
    reward_funcs: list[Any] = Field(
        ..., min_length=1, description="Reward functions, summed (weights: reward_weights): registered names "
                                       "(exact_match, format, length_penalty, ...), 'module:function' or "
                                       "'path/to/file.py:function'; the Python API also takes callables.",
        json_schema_extra={"items": {"type": "string"}})
    reward_weights: list[float] | None = Field(None, description="One weight per reward function (default: all 1).")
    num_generations: int = Field(8, ge=2, description="Completions sampled per prompt (the group whose rewards are "
                                                      "compared); must divide the generation batch.")
    max_completion_length: int = Field(256, gt=0, description="Longest completion, in tokens.")
    temperature: float = Field(1.0, gt=0, description="Sampling temperature (the log-probabilities use it too).")
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus sampling.")
    top_k: int = Field(0, ge=0, description="Top-k sampling (0: off).")
    beta: float = Field(0.0, ge=0, description="KL coefficient to the reference (the model with its adapter off); "
                                               "0 skips the reference forward.")
    epsilon: float = Field(0.2, gt=0, description="Clipping range of the importance ratio.")
    epsilon_high: float | None = Field(None, gt=0, description="Upper clipping bound (DAPO's clip-higher); default: "
                                                               "epsilon.")
    loss_type: Literal["grpo", "dr_grpo", "bnpo", "dapo"] = Field(
        "dapo", description="grpo (per-sequence mean), dr_grpo (constant normalizer), bnpo (per-batch token mean), "
                            "dapo (token mean over the generation batch).")
    scale_rewards: Literal["group", "batch", "none"] = Field(
        "group", description="Divide advantages by the reward std of the group, of the batch, or not at all.")
    num_iterations: int = Field(1, gt=0, description="Optimization passes over each generation batch.")
    mask_truncated_completions: bool = Field(False, description="Leave completions cut at max_completion_length "
                                                                "out of the loss.")
    generation_batch_size: int | None = Field(None, gt=0, description="Completions generated at once (default: "
                                                                      "micro-batch x gradient accumulation).")

    @field_validator("reward_funcs")
    @classmethod
    def _names_or_callables(cls, value: list[Any]) -> list[Any]:
        for i, item in enumerate(value):
            if not (isinstance(item, str) or callable(item)):
                raise ValueError(f"reward_funcs[{i}]: expected a reward name, 'module:function', "
                                 f"'file.py:function' or a callable, got {type(item).__name__}")
        return value
