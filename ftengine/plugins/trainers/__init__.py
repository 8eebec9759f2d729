"""Trainers: ``sft`` (supervised fine-tuning on trl's SFTTrainer) and ``dpo`` (Direct Preference
Optimization on trl's DPOTrainer)."""

from ftengine.core.hookspecs import hookimpl
from ftengine.plugins.trainers.dpo import DPOTrainerPlugin
from ftengine.plugins.trainers.sft import SFTTrainerPlugin


@hookimpl
def register_trainers(register):
    register(SFTTrainerPlugin())
    register(DPOTrainerPlugin())
