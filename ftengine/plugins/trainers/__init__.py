"""Trainers: ``sft`` (supervised fine-tuning), ``dpo`` (DPO, IPO and trl's other DPO losses),
``orpo``, ``kto`` and ``grpo`` on trl, and the built-in reward functions of ``grpo``."""

from ftengine.core.hookspecs import hookimpl
from ftengine.plugins.trainers.dpo import DPOTrainerPlugin
from ftengine.plugins.trainers.grpo import GRPOTrainerPlugin
from ftengine.plugins.trainers.kto import KTOTrainerPlugin
from ftengine.plugins.trainers.orpo import ORPOTrainerPlugin
from ftengine.plugins.trainers.rewards import BUILTIN_REWARDS
from ftengine.plugins.trainers.sft import SFTTrainerPlugin


@hookimpl
def register_trainers(register):
    register(SFTTrainerPlugin())
    register(DPOTrainerPlugin())
    register(ORPOTrainerPlugin())
    register(KTOTrainerPlugin())
    register(GRPOTrainerPlugin())


@hookimpl
def register_rewards(register):
    for reward in BUILTIN_REWARDS:
        register(reward)
