"""Plugins of every kind written against ``ftengine.plugin`` alone, each used by a real run stage."""

import ast
import json
import pathlib

import numpy as np
import pytest
import torch

import ftengine
from ftengine.core import plugins
from ftengine.core.config import validate_config
from ftengine.engine import pipeline

from .plugins import VendorPlugin


@pytest.fixture
def vendor(monkeypatch):
    plugin = VendorPlugin()
    regs = plugins.registries()
    info = regs.add_plugin(plugin, name="vendor")
    assert info.ok, info.error
    try:
        yield plugin
    finally:
        regs.remove_plugin("vendor")


def test_the_plugins_import_only_the_public_surface():
    tree = ast.parse((pathlib.Path(__file__).parent / "plugins.py").read_text())
    modules = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    modules |= {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    assert {m for m in modules if m.startswith("ftengine")} == {"ftengine.plugin"}


def test_architecture_and_kernel_backend_patch_the_model_like_unpatched_hf(vendor, demo_base, monkeypatch):
    monkeypatch.setenv("FTENGINE_KERNELS", "counting")  # its swiglu; every other op from the reference
    config = validate_config({"model": {"name_or_path": str(demo_base), "dtype": "float32",
                                        "adapter": "vendor-qwen2"}})
    loaded = pipeline.load(config)
    reference = pipeline.load(config).model
    loaded = pipeline.patch(loaded)
    assert any("patched by 'vendor-qwen2'" in note for note in loaded.notes)
    ids = torch.randint(0, reference.config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(0))
    # autograd on: without it a forward this small is a decode step, which runs the modules' own forwards
    torch.testing.assert_close(loaded.model(ids).logits.detach(), reference(ids).logits.detach(), rtol=1e-5,
                               atol=1e-5)
    assert vendor.backend.calls == reference.config.num_hidden_layers
    assert loaded.adapter.gguf.tensor_name("model.layers.0.mlp.up_proj.weight") == "blk.0.ffn_up.weight"


def test_format_and_template_shape_the_training_rows(vendor, demo_base, tmp_path):
    data = tmp_path / "qa.jsonl"
    data.write_text("".join(json.dumps({"q": f"what is {i}?", "a": f"it is {i}"}) + "\n" for i in range(6)))
    _, tokenizer = ftengine.load_model(str(demo_base), dtype="float32")
    dataset = ftengine.load_dataset(str(data), tokenizer, chat_template="vendor-plain", max_seq_length=64)
    assert dataset.ftengine_report.format == "vendor-qa" and len(dataset) == 6
    row = dataset[3]
    trained = tokenizer.decode([t for t, label in zip(row["input_ids"], row["labels"], strict=True) if label != -100])
    assert trained == "it is 3\n"
    assert tokenizer.decode(row["input_ids"]) == "user: what is 3?\nassistant: it is 3\n"
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"q": "x", "a": 3}) + "\n")
    with pytest.raises(ftengine.core.errors.DataError, match="row 1.*'a'.*expected a string answer"):
        ftengine.load_dataset(str(bad), tokenizer, chat_template="vendor-plain")


def test_exporter_writes_the_merged_weights(vendor, demo_base, tmp_path):
    model, _ = ftengine.load_model(str(demo_base), dtype="float32")
    model = ftengine.add_lora(model, r=4, use_gradient_checkpointing=False)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.1)  # a trained-looking adapter, so the merge changes the weights
    out = ftengine.export(model, None, str(tmp_path / "npz"), format="vendor-npz")
    archive = np.load(out / "model.npz")
    merged = model.merge_and_unload().state_dict()
    assert set(archive.files) == {n for n in merged if n != "lm_head.weight" or not model.config.tie_word_embeddings}
    for name in archive.files:
        np.testing.assert_allclose(archive[name], merged[name].numpy(), rtol=1e-6, atol=1e-6)
