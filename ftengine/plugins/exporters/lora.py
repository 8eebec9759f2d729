"""The ``lora`` exporter: a peft adapter directory that ``PeftModel.from_pretrained`` loads."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import BaseModel
from pydantic import ConfigDict

from ftengine.core.errors import ExportError


class LoRAOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")


class LoRAExporter:
    name = "lora"
    description = "peft adapter (adapter_config.json + adapter_model.safetensors) with the tokenizer"
    options_schema = LoRAOptions

    def export(self, model: Any, tokenizer: Any, out_dir: Path, options: LoRAOptions) -> list[str]:
        if not hasattr(model, "peft_config"):
            raise ExportError("the 'lora' export needs a LoRA model; this run fine-tuned the full model: "
                              "export it with 'merged' or 'gguf'")
        init = str(model.peft_config[model.active_adapter].init_lora_weights).lower()
        if init.startswith(("pissa", "olora", "loftq")):
            raise ExportError(f"init_lora_weights={init!r} rewrote the base weights, so this adapter only applies to "
                              f"that rewritten base; export 'merged' or 'gguf' instead")
        model.save_pretrained(str(out_dir), safe_serialization=True)
        tokenizer.save_pretrained(str(out_dir))
        adapter = model.peft_config[model.active_adapter]
        targets = adapter.target_modules
        targets = f"modules matching {targets}" if isinstance(targets, str) else ", ".join(sorted(targets))
        return [f"adapter r={adapter.r} on {targets}",
                f"base model: {adapter.base_model_name_or_path}"]
