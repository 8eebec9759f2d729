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
from pydantic import ValidationInfo
from pydantic import field_validator

DPO_LOSS_TYPES = Literal["sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard", "aot",
                         "aot_unpaired", "apo_zero", "apo_down", "discopop", "sft", "sigmoid_norm", "simpo"]


class Options(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class DPOOptions(Options):
    beta: float = Field(0.1, gt=0, description="Strength of the implicit KL penalty to the reference (IPO: its "
                                               "regularization parameter; SimPO: the reward scale, 2 to 2.5 in "
                                               "the paper).")
    loss_type: DPO_LOSS_TYPES | list[DPO_LOSS_TYPES] = Field(
        "sigmoid", description="The preference loss: sigmoid (DPO), ipo (IPO), hinge (SLiC), robust, exo_pair, "
                               "bco_pair, sppo_hard, nca_pair, aot, aot_unpaired, apo_zero, apo_down, discopop, "
                               "sigmoid_norm (length-normalized DPO), sft, or simpo (SimPO: length-normalized and "
                               "reference-free); a list combines several (weights: loss_weights), simpo excepted.")
    loss_weights: list[float] | None = Field(None, description="Weights of the losses of a loss_type list.")
    label_smoothing: float = Field(
        0.0, ge=0, lt=0.5, validate_default=True,
        description="Robust DPO / cDPO / aot / SimPO: assumed label noise; exo_pair: its epsilon (> 0).")
    simpo_gamma: float = Field(0.5, description="SimPO's target reward margin gamma (loss_type simpo): the loss is "
                                                "-log sigmoid(beta * (mean logp chosen - mean logp rejected) - "
                                                "simpo_gamma).")
    cpo_alpha: float = Field(0.0, ge=0, description="Weight of the chosen answer's NLL added to the SimPO loss "
                                                    "(CPO-SimPO); 0 is plain SimPO.")

    @field_validator("loss_type")
    @classmethod
    def _simpo_alone(cls, value: Any) -> Any:
        if isinstance(value, list) and "simpo" in value and len(value) > 1:
            raise ValueError("simpo alone (reference-free, it combines with no other loss)")
        return value

    @field_validator("loss_weights")
    @classmethod
    def _one_weight_per_loss(cls, value: list[float] | None, info: ValidationInfo) -> list[float] | None:
        types = info.data.get("loss_type")
        count = len(types) if isinstance(types, list) else 1
        if value is not None and types is not None and len(value) != count:
            raise ValueError(f"one weight per loss_type ({count})")
        return value

    @field_validator("label_smoothing")
    @classmethod
    def _exo_epsilon(cls, value: float, info: ValidationInfo) -> float:
        types = info.data.get("loss_type")
        if value == 0 and "exo_pair" in (types if isinstance(types, list) else [types]):
            raise ValueError("a value > 0 for exo_pair (its epsilon; 1e-3 in the paper)")
        return value


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
    generation_backend: Literal["auto", "static", "transformers"] = Field(
        "auto", description="What samples the completions: static (a preallocated KV cache, each token's forward "
                            "replayed from a CUDA graph on a GPU), transformers (its generate), or auto (static "
                            "where the model allows it).")

    @field_validator("reward_funcs")
    @classmethod
    def _names_or_callables(cls, value: list[Any]) -> list[Any]:
        for i, item in enumerate(value):
            if not (isinstance(item, str) or callable(item)):
                raise ValueError(f"reward_funcs[{i}]: expected a reward name, 'module:function', "
                                 f"'file.py:function' or a callable, got {type(item).__name__}")
        return value
