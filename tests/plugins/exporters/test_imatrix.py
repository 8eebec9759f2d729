"""Importance matrices: collected activations against a manual forward, llama.cpp's file formats,
the LoRA model's activations equal to the merged model's, and the exporter's imatrix and multi-type options."""

import struct

import numpy as np
import pytest
import torch
from gguf import GGUFReader
from gguf import GGUFWriter
from gguf import quants as gguf_quants
from peft import LoraConfig
from peft import get_peft_model
from tokenizers import Tokenizer
from tokenizers import decoders
from tokenizers import models
from tokenizers import pre_tokenizers
from tokenizers import trainers
from transformers import LlamaConfig
from transformers import LlamaForCausalLM
from transformers import PreTrainedTokenizerFast

from ftengine.core.config import ExportEntry
from ftengine.core.config import config_schema
from ftengine.core.errors import ExportError
from ftengine.engine.exporting import export_names
from ftengine.plugins.exporters.gguf import writer as writer_module
from ftengine.plugins.exporters.gguf.exporter import GGUFExporter
from ftengine.plugins.exporters.gguf.exporter import gguf_name_of
from ftengine.plugins.exporters.gguf.imatrix import ImportanceMatrix
from ftengine.plugins.exporters.gguf.imatrix import collect

ROWS = [[3, 17, 42, 99, 7, 250, 31, 8], [5, 5, 120, 64, 33, 2, 18, 77]]
TEXT = "the cat sat on the mat\n\nhello world, it's a test\n\nmore words for the chunks"


def _llama(hidden: int = 64) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=300, hidden_size=hidden, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(config).eval()


def _tokenizer() -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<s>", "</s>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([TEXT] * 3, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>")


def test_collected_means_are_the_squared_inputs_of_a_manual_forward():
    model = _llama()
    imatrix = collect(model, ROWS, gguf_name_of(model), chunk_size=8)
    assert imatrix.chunk_count == 2 and imatrix.counts["blk.0.attn_q.weight"] == 16
    with torch.no_grad():
        states = [model(torch.tensor([row]), output_hidden_states=True).hidden_states for row in ROWS]
        q_input = torch.cat([model.model.layers[0].input_layernorm(h[0])[0] for h in states])  # (16, hidden)
        head_input = torch.cat([h[-1][0] for h in states])  # the final norm's output
    torch.testing.assert_close(imatrix.importance("blk.0.attn_q.weight"), (q_input**2).mean(0))
    torch.testing.assert_close(imatrix.importance("blk.0.attn_v.weight"), (q_input**2).mean(0))
    torch.testing.assert_close(imatrix.importance("output.weight"), (head_input**2).mean(0))
    assert imatrix.importance("blk.1.ffn_down.weight").shape == (128,)
    assert not any("norm" in name or "token_embd" in name for name in imatrix.sums)


def test_lora_model_collects_the_merged_models_activations():
    model = _llama()
    peft_model = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj", "down_proj"]))
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.5)
    ours = collect(peft_model, ROWS, gguf_name_of(model), chunk_size=8)
    merged = collect(peft_model.merge_and_unload(), ROWS, gguf_name_of(model), chunk_size=8)
    assert set(ours.sums) == set(merged.sums)
    for name in ours.sums:
        torch.testing.assert_close(ours.importance(name), merged.importance(name), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("suffix", [".gguf", ".dat"])
def test_files_read_back(tmp_path, suffix):
    model = _llama()
    imatrix = collect(model, ROWS, gguf_name_of(model), chunk_size=8, dataset="calibration.txt")
    loaded = ImportanceMatrix.load(imatrix.save(tmp_path / f"imatrix{suffix}"))
    assert set(loaded.sums) == set(imatrix.sums)
    for name in imatrix.sums:
        torch.testing.assert_close(loaded.importance(name), imatrix.importance(name))
    assert loaded.chunk_count == 2 and loaded.datasets == ["calibration.txt"]


def test_gguf_file_has_llama_cpp_layout(tmp_path):
    imatrix = ImportanceMatrix({"blk.0.ffn_up.weight": torch.tensor([2.0, 8.0], dtype=torch.float64)},
                               {"blk.0.ffn_up.weight": 4}, chunk_count=1, chunk_size=4)
    reader = GGUFReader(imatrix.save(tmp_path / "m.gguf"))
    assert reader.get_field("general.type").contents() == "imatrix"
    assert "general.architecture" not in reader.fields
    assert reader.get_field("imatrix.chunk_size").contents() == 4
    tensors = {t.name: t for t in reader.tensors}
    assert list(tensors["blk.0.ffn_up.weight.in_sum2"].shape) == [2, 1]  # ne0 = columns, ne1 = matrices
    np.testing.assert_array_equal(np.asarray(tensors["blk.0.ffn_up.weight.counts"].data).reshape(-1), [4.0])


def test_reads_files_written_by_llama_cpp(tmp_path):
    """Files laid out by the formats' definitions: legacy .dat (mean * ncall) and GGUF with two experts."""
    values = np.array([0.5, 1.5, 3.0], dtype="<f4")
    name = b"blk.0.attn_k.weight"
    dat = (struct.pack("<i", 1) + struct.pack("<i", len(name)) + name + struct.pack("<ii", 10, 3)
           + (values * 10).tobytes() + struct.pack("<i", 10) + struct.pack("<i", 4) + b"wiki")
    (tmp_path / "old.dat").write_bytes(dat)
    legacy = ImportanceMatrix.load(tmp_path / "old.dat")
    np.testing.assert_allclose(legacy.importance("blk.0.attn_k.weight").numpy(), values, rtol=1e-6)
    assert legacy.datasets == ["wiki"] and legacy.chunk_count == 10

    writer = GGUFWriter(tmp_path / "new.gguf", arch="")
    writer.kv_data[0].clear()
    writer.add_string("general.type", "imatrix")
    writer.add_tensor("blk.0.ffn_down_exps.weight.in_sum2", np.array([[2.0, 4.0], [6.0, 8.0]], dtype=np.float32))
    writer.add_tensor("blk.0.ffn_down_exps.weight.counts", np.array([[2.0], [2.0]], dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    experts = ImportanceMatrix.load(tmp_path / "new.gguf")
    np.testing.assert_allclose(experts.importance("blk.0.ffn_down_exps.weight").numpy(), [2.0, 3.0])

    (tmp_path / "junk.gguf").write_bytes(b"GGUF" + b"\0" * 20)
    with pytest.raises(ExportError, match="junk.gguf"):
        ImportanceMatrix.load(tmp_path / "junk.gguf")


def test_exporter_imatrix_options(tmp_path):
    model, tokenizer = _llama(hidden=256), _tokenizer()
    with pytest.raises(ExportError, match="imatrix_data"):
        GGUFExporter().export(model, tokenizer, tmp_path / "none", {"quantization": "q4_k_m", "imatrix": True})
    (tmp_path / "calibration.txt").write_text(TEXT)
    out = tmp_path / "computed"
    lines = GGUFExporter().export(model, tokenizer, out, {"quantization": "q4_k_m", "imatrix": True,
                                                          "imatrix_data": str(tmp_path / "calibration.txt")})
    assert sorted(p.name for p in out.iterdir()) == ["Modelfile", "imatrix.gguf", "model-q4_k_m.gguf"]
    assert "imatrix: 15 entries, used for 14 tensor(s)" in lines  # the fallback Q5_0 too, not the Q8_0 one
    again = tmp_path / "from-file"
    GGUFExporter().export(model, tokenizer, again, {"quantization": "q4_k_m", "imatrix": str(out / "imatrix.gguf")})
    first, second = (GGUFReader(d / "model-q4_k_m.gguf").tensors for d in (out, again))
    assert [t.tensor_type for t in first] == [t.tensor_type for t in second]
    # the file keeps float32 sums: a near tie may break the other way in a few blocks
    values = [(gguf_quants.dequantize(a.data, a.tensor_type), gguf_quants.dequantize(b.data, b.tensor_type))
              for a, b in zip(first, second, strict=True)]
    assert np.mean(np.concatenate([(a != b).reshape(-1) for a, b in values])) < 0.02


def test_training_rows_are_the_default_calibration(tmp_path):
    model, tokenizer = _llama(hidden=256), _tokenizer()
    calibration = [{"input_ids": row} for row in ROWS]
    GGUFExporter().export(model, tokenizer, tmp_path, {"quantization": "iq4_xs", "imatrix": True}, calibration)
    imatrix = ImportanceMatrix.load(tmp_path / "imatrix.gguf")
    assert imatrix.counts["blk.0.attn_q.weight"] == 16 and imatrix.datasets == ["training data"]


def test_python_api_export_passes_the_calibration_rows(tmp_path):
    import ftengine

    model, tokenizer = _llama(hidden=256), _tokenizer()
    calibration = [{"input_ids": row} for row in ROWS]
    out = ftengine.export(model, tokenizer, str(tmp_path / "gguf"), format="gguf", quantization="iq4_xs",
                          imatrix=True, calibration=calibration)
    assert ImportanceMatrix.load(out / "imatrix.gguf").counts["blk.0.attn_q.weight"] == 16


def test_several_types_merge_once(tmp_path, monkeypatch):
    model, tokenizer = _llama(hidden=256), _tokenizer()
    merges = []
    original = writer_module.iter_merged_tensors

    def counted(*args, **kwargs):
        merges.append(1)
        yield from original(*args, **kwargs)

    monkeypatch.setattr(writer_module, "iter_merged_tensors", counted)
    lines = GGUFExporter().export(model, tokenizer, tmp_path, {"quantization": ["q4_k_m", "Q8_0", "quantized"]})
    assert merges == [1]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["q4_k_m", "q8_0"]
    for q in ("q4_k_m", "q8_0"):
        assert sorted(p.name for p in (tmp_path / q).iterdir()) == ["Modelfile", f"model-{q}.gguf"]
        assert f"FROM ./model-{q}.gguf" in (tmp_path / q / "Modelfile").read_text()
    single = tmp_path / "single.gguf"
    writer_module.write_gguf(model, tokenizer, single, "q4_k_m")
    assert (tmp_path / "q4_k_m" / "model-q4_k_m.gguf").read_bytes() == single.read_bytes()
    assert sum(line.startswith("model-") for line in lines) == 2


def test_repeated_export_formats_get_their_own_directories():
    entries = [ExportEntry(format="gguf"), ExportEntry(format="lora"), ExportEntry(format="gguf")]
    assert export_names(entries) == ["gguf", "lora", "gguf-2"]


def test_config_schema_shows_the_gguf_options():
    gguf = config_schema()["x-exporter-options"]["gguf"]["properties"]
    assert {"quantization", "imatrix", "imatrix_data", "imatrix_chunks"} <= set(gguf)
    assert "iq4_xs" in gguf["quantization"]["description"]


def test_run_exports_gguf_with_an_imatrix_of_its_training_data(demo_base, tmp_path):
    """A whole run: the gguf entry's imatrix comes from the run's own training rows; a second gguf entry
    gets its own directory."""
    from ftengine.core.config import validate_config
    from ftengine.demo import demo_config
    from ftengine.engine.pipeline import run
    from ftengine.plugins.models._patching import routing_report

    raw = demo_config().model_dump(mode="json")
    raw["training"].update(max_steps=2, save_steps=100, logging_steps=1)
    raw["export"] = [{"format": "gguf", "quantization": ["iq4_nl", "q8_0"], "imatrix": True, "imatrix_chunks": 2,
                      "imatrix_chunk_size": 64},
                     {"format": "gguf", "quantization": "q4_0"}]
    result = run(validate_config(raw), output_dir=str(tmp_path))
    exports = result.run_dir.exports
    assert sorted(p.name for p in exports.iterdir()) == ["gguf", "gguf-2"]
    imatrix = ImportanceMatrix.load(exports / "gguf" / "imatrix.gguf")
    assert imatrix.datasets == ["training data"] and imatrix.chunk_count == 2
    layers = result.model.config.num_hidden_layers
    every_linear = {f"blk.{i}.{name}.weight" for i in range(layers) for name in (
        "attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")}
    assert every_linear <= set(imatrix.counts)  # through the patched model's layers too
    assert {imatrix.counts[name] for name in every_linear} == {2 * 64}
    assert any("lora" in line for line in routing_report(result.model))  # patched again afterwards
    assert (exports / "gguf" / "iq4_nl" / "model-iq4_nl.gguf").exists()
    assert (exports / "gguf-2" / "model-q4_0.gguf").exists()


def test_a_resumed_run_calibrates_its_missing_export_on_the_training_rows(demo_base, tmp_path, monkeypatch):
    """Training finished but the gguf export failed: ``--resume`` writes it, its imatrix computed on the
    run's training rows (read again from data.path, tokenized as the run did)."""
    from ftengine.core.config import validate_config
    from ftengine.demo import demo_config
    from ftengine.engine.pipeline import run
    from ftengine.engine.rundir import RunDir
    from ftengine.plugins.exporters.gguf import exporter as exporter_module

    raw = demo_config().model_dump(mode="json")
    raw["training"].update(max_steps=2, save_steps=2, logging_steps=1)
    raw["export"] = [{"format": "gguf", "quantization": "iq4_nl", "imatrix": True, "imatrix_chunks": 2,
                      "imatrix_chunk_size": 64}]
    config = validate_config(raw)

    def disk_trouble(*args, **kwargs):
        raise OSError(5, "Input/output error")

    with monkeypatch.context() as patched:
        patched.setattr(exporter_module, "write_ggufs", disk_trouble)
        first = run(config, output_dir=str(tmp_path))
    assert first.failed_exports and first.run_dir.status()["status"] == "exports_failed"
    again = run(config, run_dir=RunDir(first.run_dir.path), resume=True)
    assert again.run_dir.status()["status"] == "completed" and again.train.steps == 2
    imatrix = ImportanceMatrix.load(again.run_dir.exports / "gguf" / "imatrix.gguf")
    assert imatrix.datasets == ["training data"] and imatrix.chunk_count == 2
