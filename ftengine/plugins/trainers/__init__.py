"""Trainers: ``sft`` (supervised fine-tuning on trl's SFTTrainer)."""

from ftengine.core.hookspecs import hookimpl
from ftengine.plugins.trainers.sft import SFTTrainerPlugin


@hookimpl
def register_trainers(register):
    register(SFTTrainerPlugin())
