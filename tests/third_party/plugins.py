"""Third-party plugins of every kind, written against the public surface ``ftengine.plugin`` alone (a
test checks the imports): what a vendor's package would hold."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from ftengine.plugin import ChatTemplate
from ftengine.plugin import DecoderAdapter
from ftengine.plugin import GGUFLayout
from ftengine.plugin import PatchTable
from ftengine.plugin import RowError
from ftengine.plugin import Sample
from ftengine.plugin import hookimpl
from ftengine.plugin import iter_merged_tensors

QWEN2_AGAIN = DecoderAdapter(
    name="vendor-qwen2",
    model_types=("qwen2",),
    table=PatchTable(norms=("Qwen2RMSNorm",), attentions=("Qwen2Attention",), mlps=("Qwen2MLP",),
                     causal_lms=("Qwen2ForCausalLM",)),
    default_chat_template="chatml",
    gguf=GGUFLayout(architecture="qwen2"),
)


class CountingBackend:
    """A kernel backend with one op, ``swiglu``, that counts its calls."""

    name, priority = "counting", 100

    def __init__(self) -> None:
        self.calls = 0

    def available(self) -> bool:
        return True

    def swiglu(self, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return torch.nn.functional.silu(gate) * up


class QuestionAnswerFormat:
    """``{"q": ..., "a": ...}`` rows."""

    name, description = "vendor-qa", "q/a pairs"

    def detect(self, row: dict[str, Any]) -> bool:
        return set(row) == {"q", "a"}

    def convert(self, row: dict[str, Any]) -> Sample:
        if not isinstance(row.get("a"), str):
            raise RowError("expected a string answer", field="a")
        return Sample(messages=[{"role": "user", "content": row["q"]}, {"role": "assistant", "content": row["a"]}])


PLAIN_QA = ChatTemplate(
    name="vendor-plain",
    jinja="{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
          "{% if add_generation_prompt %}assistant: {% endif %}",
    description="role: content lines",
)


class NpzExporter:
    """The merged weights as one NumPy archive."""

    name, description, options_schema = "vendor-npz", "merged weights as model.npz", None

    def export(self, model: Any, tokenizer: Any, out_dir: Path, options: Any) -> list[str]:
        arrays = {name: tensor.numpy() for name, tensor in iter_merged_tensors(model, torch.float32)}
        np.savez(out_dir / "model.npz", **arrays)
        return [f"{len(arrays)} tensors in {out_dir / 'model.npz'}"]


class VendorPlugin:
    """One plugin registering one thing of each kind."""

    def __init__(self) -> None:
        self.backend = CountingBackend()

    @hookimpl
    def register_models(self, register):
        register(QWEN2_AGAIN)

    @hookimpl
    def register_kernels(self, register):
        register(self.backend)

    @hookimpl
    def register_formats(self, register):
        register(QuestionAnswerFormat())

    @hookimpl
    def register_chat_templates(self, register):
        register(PLAIN_QA)

    @hookimpl
    def register_exporters(self, register):
        register(NpzExporter())
