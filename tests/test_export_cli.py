"""``ftengine export`` from a finished run or one of its checkpoints."""

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from ftengine.cli import main
from ftengine.engine import pipeline


@pytest.fixture(scope="module")
def finished_run(demo_base, make_tiny_run_config, tmp_path_factory):
    from ftengine.demo import ASSETS

    config = make_tiny_run_config(demo_base, ASSETS / "data.jsonl", tmp_path_factory.mktemp("export-cli"), save_steps=2)
    return pipeline.run(config)


def export(*args):
    return CliRunner().invoke(main, ["export", *map(str, args)])


def test_export_a_checkpoint(finished_run):
    checkpoint = finished_run.run_dir.path / "checkpoints" / "checkpoint-2"
    result = export(checkpoint, "--format", "lora", "--format", "gguf", "--quant", "q8_0")
    assert result.exit_code == 0, result.output
    out = finished_run.run_dir.path / "exports-checkpoint-2"
    exported = load_file(str(out / "lora" / "adapter_model.safetensors"))
    saved = load_file(str(checkpoint / "adapter_model.safetensors"))
    assert exported.keys() == saved.keys()
    for key in saved:
        torch.testing.assert_close(exported[key], saved[key])
    (gguf_file,) = (out / "gguf").glob("*.gguf")
    from gguf import GGUFReader

    reader = GGUFReader(str(gguf_file))
    assert len(reader.tensors) > 10
    assert (out / "gguf" / "Modelfile").exists()


def test_existing_output_needs_overwrite(finished_run):
    run = finished_run.run_dir.path
    first = export(run, "--format", "merged")
    assert first.exit_code == 0, first.output
    marker = run / "exports" / "merged" / "config.json"
    before = marker.stat().st_mtime_ns
    again = export(run, "--format", "merged")
    assert again.exit_code == 1 and "already exists (pass --overwrite" in again.output
    assert marker.stat().st_mtime_ns == before
    assert export(run, "--format", "merged", "--overwrite").exit_code == 0


def test_bad_sources_and_options(finished_run, tmp_path):
    assert "neither a run directory" in export(tmp_path, "--format", "lora").output
    bad_quant = export(finished_run.run_dir.path, "--format", "gguf", "--quant", "q3_weird")
    assert bad_quant.exit_code == 1 and "q3_weird" in bad_quant.output
    assert not (finished_run.run_dir.path / "exports" / "gguf").exists()


def test_export_a_full_finetuning_run(demo_base, make_tiny_run_config, tmp_path):
    from transformers import AutoModelForCausalLM

    from ftengine.demo import ASSETS

    config = make_tiny_run_config(demo_base, ASSETS / "data.jsonl", tmp_path, max_steps=2)
    config.model.full_finetuning = True
    result = pipeline.run(config)
    trained = result.model.eval()
    out = export(result.run_dir.path, "--format", "merged")
    assert out.exit_code == 0, out.output
    merged = AutoModelForCausalLM.from_pretrained(str(result.run_dir.path / "exports" / "merged")).float().eval()
    ids = torch.tensor([[1, 17, 45, 300, 9]])
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=ids).logits, trained(input_ids=ids).logits, atol=5e-2, rtol=0)
