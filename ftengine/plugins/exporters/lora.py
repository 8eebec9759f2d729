"""The ``lora`` exporter: a peft adapter directory that ``PeftModel.from_pretrained`` loads."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import BaseModel
from pydantic import ConfigDict

from ftengine.core.errors import ExportError


class LoRAOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")


REWRITING_INITS = ("pissa", "olora", "loftq")


def rewritten_base(init: str) -> str:
    return (f"init_lora_weights={init!r} rewrites the base weights, so the adapter alone applies only to that "
            f"rewritten base; export 'merged' or 'gguf' instead")


class LoRAExporter:
    name = "lora"
    description = "peft adapter (adapter_config.json + adapter_model.safetensors) with the tokenizer"
    options_schema = LoRAOptions

    def check(self, options: LoRAOptions, config: Any, hf_config: Any) -> list[str]:
        """Before training: an initialisation that rewrites the base (PiSSA, OLoRA, LoftQ) has no
        stand-alone adapter."""
        init = str(config.lora.init_lora_weights).lower()
        return [rewritten_base(init)] if init.startswith(REWRITING_INITS) else []

    def export(self, model: Any, tokenizer: Any, out_dir: Path, options: LoRAOptions) -> list[str]:
        if not hasattr(model, "peft_config"):
            raise ExportError("the 'lora' export needs a LoRA model; this run fine-tuned the full model: "
                              "export it with 'merged' or 'gguf'")
        init = str(model.peft_config[model.active_adapter].init_lora_weights).lower()
        if init.startswith(REWRITING_INITS):
            raise ExportError(rewritten_base(init))
        model.save_pretrained(str(out_dir), safe_serialization=True)
        if tokenizer is not None:  # the adapter alone (the compat layer's ``save_lora``)
            tokenizer.save_pretrained(str(out_dir))
        adapter = model.peft_config[model.active_adapter]
        targets = adapter.target_modules
        targets = f"modules matching {targets}" if isinstance(targets, str) else ", ".join(sorted(targets))
        return [f"adapter r={adapter.r} on {targets}",
                f"base model: {adapter.base_model_name_or_path}"]
