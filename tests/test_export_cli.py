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


def _tensors(path):
    from gguf import GGUFReader

    return {t.name: bytes(t.data.tobytes()) for t in GGUFReader(str(path)).tensors}


def _matrix(path):
    from ftengine.plugins.exporters.gguf.imatrix import ImportanceMatrix

    return ImportanceMatrix.load(path)


def _unpatched(run):
    """The run's final checkpoint loaded as a Python user loads a model (not kernel-patched)."""
    from ftengine.core.config import load_config
    from ftengine.engine.export_source import load_checkpoint

    return load_checkpoint(load_config(run.run_dir.config_path), run.run_dir.latest_checkpoint())


def _same_matrix(a, b):
    assert a.sums.keys() == b.sums.keys() and a.counts == b.counts and a.chunk_count == b.chunk_count > 0
    for name in a.sums:
        torch.testing.assert_close(a.sums[name], b.sums[name], rtol=1e-5, atol=1e-8)


def test_imatrix_from_the_runs_training_data_as_the_python_api_computes_it(finished_run, tmp_path):
    """``--imatrix`` alone collects on the run's training rows: the same matrix (and the same Q4_0 bytes)
    as ``ftengine.export(..., imatrix=True, calibration=rows)`` given the rows of the public data loader."""
    import ftengine
    from ftengine.demo import ASSETS

    out = tmp_path / "cli"
    result = export(finished_run.run_dir.path, "--format", "gguf", "--quantization", "q4_0", "--imatrix",
                    "--output", out)
    assert result.exit_code == 0, result.output
    assert "importance matrix" in result.output and "training data" in result.output
    cli_matrix = _matrix(out / "gguf" / "imatrix.gguf")
    assert cli_matrix.datasets == ["training data"]

    model, tokenizer = _unpatched(finished_run)
    rows = ftengine.load_dataset(str(ASSETS / "data.jsonl"), tokenizer=tokenizer, format="messages", max_seq_length=64)
    api = ftengine.export(model, tokenizer, str(tmp_path / "api"), format="gguf", quantization="q4_0", imatrix=True,
                          calibration=rows)
    _same_matrix(cli_matrix, _matrix(api / "imatrix.gguf"))
    cli_tensors, api_tensors = _tensors(out / "gguf" / "model-q4_0.gguf"), _tensors(api / "model-q4_0.gguf")
    assert cli_tensors.keys() == api_tensors.keys()
    same = sum(cli_tensors[name] == api_tensors[name] for name in cli_tensors)
    assert same >= len(cli_tensors) - 2  # float summation order may flip a near tie in a tensor or two

    plain = ftengine.export(model, tokenizer, str(tmp_path / "plain"), format="gguf", quantization="q4_0")
    plain_tensors = _tensors(plain / "model-q4_0.gguf")
    assert plain_tensors["blk.0.ffn_down.weight"] != cli_tensors["blk.0.ffn_down.weight"]


def test_imatrix_from_calibration_data_and_from_a_file(finished_run, tmp_path):
    """``--calibration-data FILE`` computes the matrix on that text (as the API's ``calibration=FILE``);
    ``--imatrix PATH`` reads a llama.cpp file and quantizes with it (as the API's ``imatrix=PATH``)."""
    import ftengine

    text = tmp_path / "calibration.txt"
    text.write_text("The quick brown fox jumps over the lazy dog.\n\nHello there, how are you today?\n" * 8)
    out = tmp_path / "from-text"
    result = export(finished_run.run_dir.path, "--format", "gguf", "--quant", "q4_0", "--calibration-data", text,
                    "--output", out)
    assert result.exit_code == 0, result.output
    computed = _matrix(out / "gguf" / "imatrix.gguf")
    assert computed.datasets == [str(text)]
    model, tokenizer = _unpatched(finished_run)
    api = ftengine.export(model, tokenizer, str(tmp_path / "api-text"), format="gguf", quantization="q4_0",
                          calibration=str(text))
    _same_matrix(computed, _matrix(api / "imatrix.gguf"))

    legacy = computed.save(tmp_path / "llama.dat")
    out = tmp_path / "from-file"
    result = export(finished_run.run_dir.path, "--format", "gguf", "--quant", "q4_0", "--imatrix", legacy,
                    "--output", out)
    assert result.exit_code == 0, result.output
    assert f"importance matrix: {legacy}" in result.output
    api = ftengine.export(model, tokenizer, str(tmp_path / "api-file"), format="gguf", quantization="q4_0",
                          imatrix=str(legacy))
    cli_tensors, api_tensors = _tensors(out / "gguf" / "model-q4_0.gguf"), _tensors(api / "model-q4_0.gguf")
    assert sum(cli_tensors[n] == api_tensors[n] for n in cli_tensors) >= len(cli_tensors) - 2


def test_imatrix_flag_errors(finished_run, tmp_path):
    run = finished_run.run_dir.path
    no_gguf = export(run, "--format", "lora", "--imatrix", "--output", tmp_path / "a")
    assert no_gguf.exit_code == 1 and "add --format gguf" in no_gguf.output
    both = export(run, "--format", "gguf", "--imatrix", tmp_path / "x.dat", "--calibration-data", tmp_path / "c.txt",
                  "--output", tmp_path / "b")
    assert both.exit_code == 1 and "pass one of them" in both.output
    missing = export(run, "--format", "gguf", "--imatrix", tmp_path / "none.dat", "--output", tmp_path / "c")
    assert missing.exit_code == 1 and "none.dat" in missing.output
    assert not (tmp_path / "c" / "gguf").exists()
