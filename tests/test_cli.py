"""The CLI: bad input gives one clear line on stderr and leaves nothing that looks finished."""

import json
import subprocess
import sys

import pytest
from click.testing import CliRunner

from ftengine.cli import main


def invoke(*args, **kwargs):
    return CliRunner().invoke(main, list(args), catch_exceptions=False, **kwargs)


class Result:
    def __init__(self, returncode, stdout, stderr):
        self.returncode, self.stdout, self.stderr = returncode, stdout, stderr


def cli(*args):
    """The command in-process (fast); ``test_console_script`` runs the real executable once."""
    result = CliRunner().invoke(main, list(args))
    stderr = result.stderr
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        import traceback

        stderr += "".join(traceback.format_exception(result.exception))
    return Result(result.exit_code, result.stdout, stderr)


def test_console_script(tmp_path):
    result = subprocess.run([sys.executable, "-m", "ftengine", "run", str(tmp_path / "nope.yaml")],
                            capture_output=True, text=True, timeout=300)
    assert_one_line_error(result, "config file not found")


def write_config(tmp_path, model, data, **extra):
    import yaml

    raw = {"model": {"name_or_path": str(model)}, "data": {"path": str(data)},
           "output": {"dir": str(tmp_path / "runs")}, **extra}
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def assert_one_line_error(result, *fragments):
    assert result.returncode == 1, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert lines[-1].startswith("error: "), result.stderr
    assert "Traceback" not in result.stderr
    for fragment in fragments:
        assert fragment in result.stderr


def test_missing_config_file(tmp_path):
    assert_one_line_error(cli("run", str(tmp_path / "nope.yaml")), "config file not found")


def test_unreadable_yaml(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("model: {name_or_path: [x\n")
    assert_one_line_error(cli("run", str(path)), "not valid YAML")


def test_missing_model_path(tmp_path, demo_base):
    from ftengine.demo import ASSETS

    path = write_config(tmp_path, tmp_path / "no-model", ASSETS / "data.jsonl")
    assert_one_line_error(cli("run", str(path)), "model path does not exist")
    assert not (tmp_path / "runs").exists()


def test_missing_dataset(tmp_path, demo_base):
    path = write_config(tmp_path, demo_base, tmp_path / "missing.jsonl")
    assert_one_line_error(cli("run", str(path)), "missing.jsonl: dataset file not found")
    assert not (tmp_path / "runs").exists()


def test_model_type_no_plugin_serves(tmp_path):
    from ftengine.demo import ASSETS

    model = tmp_path / "weird-model"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"model_type": "weirdformer", "hidden_size": 8}))
    (model / "tokenizer_config.json").write_text("{}")
    path = write_config(tmp_path, model, ASSETS / "data.jsonl")
    assert_one_line_error(cli("run", str(path)), "model type 'weirdformer' is served by no ftengine plugin",
                          "qwen2")
    assert not (tmp_path / "runs").exists()


def test_flex_attention_without_cuda(tmp_path, demo_base, monkeypatch):
    import torch
    import yaml

    from ftengine.demo import ASSETS

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    path = write_config(tmp_path, demo_base, ASSETS / "data.jsonl")
    raw = yaml.safe_load(path.read_text())
    raw["model"]["attn_implementation"] = "flex_attention"
    path.write_text(yaml.safe_dump(raw))
    assert_one_line_error(cli("run", str(path)), "model.attn_implementation: flex_attention trains on a CUDA GPU only",
                          "use sdpa, or auto")
    assert not (tmp_path / "runs").exists()


def test_debug_shows_traceback(tmp_path):
    result = cli("run", str(tmp_path / "nope.yaml"), "--debug")
    assert result.returncode != 0 and "Traceback" in result.stderr


def test_invalid_config_lists_problems(tmp_path, demo_base):
    from ftengine.demo import ASSETS

    path = write_config(tmp_path, demo_base, ASSETS / "data.jsonl", training={"lerning_rate": 1})
    result = cli("run", str(path))
    assert result.returncode == 1
    assert "training.lerning_rate: unknown key; did you mean training.learning_rate?" in result.stderr


def test_init_writes_a_config_that_validates(tmp_path, demo_base):
    import yaml

    from ftengine.core.config import validate_config
    from ftengine.demo import ASSETS

    target = tmp_path / "config.yaml"
    assert invoke("init", str(target)).exit_code == 0
    text = target.read_text()
    assert text.startswith("# ftengine run config") and "ftengine run config.yaml" in text
    filled = text.replace("FILL_IN_MODEL", str(demo_base)).replace("FILL_IN_DATA", str(ASSETS / "data.jsonl"))
    validate_config(yaml.safe_load(filled))
    again = invoke("init", str(target))
    assert again.exit_code == 1 and "already exists" in again.output


def test_plugins_lists_first_party_and_kernel_ops():
    result = invoke("plugins")
    assert result.exit_code == 0
    assert "datasets  (ftengine 0.1.0)  [ok]" in result.output
    assert "exporters: lora, merged" in result.output
    assert "kernel ops: rms_norm -> " in result.output


def test_config_schema():
    result = invoke("config-schema")
    assert json.loads(result.output)["title"] == "RunConfig"


@pytest.mark.parametrize("args", [["--help"], ["run", "--help"], ["export", "--help"]])
def test_help(args):
    assert invoke(*args).exit_code == 0


def test_summary_reports_eval_data_and_its_skipped_rows(tiny_config, tmp_path, capsys):
    from ftengine.cli import print_summary
    from ftengine.engine import pipeline

    good = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
    eval_file = tmp_path / "eval.jsonl"
    eval_file.write_text(json.dumps(good) + "\n" + json.dumps({"messages": []}) + "\n")
    config = tiny_config(max_steps=1)
    config.data.eval_path, config.data.on_bad_rows = str(eval_file), "skip"
    print_summary(pipeline.run(config))
    out = capsys.readouterr().out
    assert "eval data" in out and "1 samples; 1 skipped (first: " in out and "eval.jsonl: row 2" in out


def test_an_infinite_learning_rate_is_refused_before_anything_runs(tmp_path, demo_base):
    from ftengine.demo import ASSETS

    path = write_config(tmp_path, demo_base, ASSETS / "data.jsonl")
    path.write_text(path.read_text() + "training:\n  learning_rate: .inf\n  warmup_steps: .nan\n")
    result = cli("run", str(path))
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "training.learning_rate: expected a finite number, got inf" in result.stderr
    assert "training.warmup_steps" in result.stderr
    assert not (tmp_path / "runs").exists()


def test_a_second_interrupt_exits_130_naming_the_last_checkpoint(tiny_config, tmp_path, monkeypatch):
    from ftengine.core.errors import StoppedAtOnce
    from ftengine.engine import pipeline

    def stopped(*args, **kwargs):
        raise StoppedAtOnce(tmp_path / "run", tmp_path / "run" / "checkpoints" / "checkpoint-3")

    monkeypatch.setattr(pipeline, "run", stopped)
    config = tiny_config()
    monkeypatch.setattr("ftengine.core.config.load_config", lambda path: config)
    result = cli("run", str(tmp_path / "config.yaml"))
    assert result.returncode == 130 and "Traceback" not in result.stderr
    assert "stopped at once by a second interrupt; last complete checkpoint: " in result.stderr
    assert f"ftengine run --resume {tmp_path / 'run'}" in result.stderr


def test_a_failed_export_keeps_the_training_and_says_how_to_redo_it(tiny_config, monkeypatch):
    from ftengine.core.config import ExportEntry
    from ftengine.core.plugins import get
    from ftengine.engine import pipeline

    config = tiny_config(max_steps=2)
    config.export = [ExportEntry(format="lora"), ExportEntry(format="merged")]
    merged = type(get("exporters", "merged"))

    def broken(self, model, tokenizer, out_dir, options):
        raise RuntimeError("the disk went away")

    monkeypatch.setattr(merged, "export", broken)
    monkeypatch.setattr("ftengine.core.config.load_config", lambda path: config)
    result = cli("run", "config.yaml")
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "export merged failed: RuntimeError: the disk went away" in result.stderr
    run_path = result.stdout.split("run directory")[1].split()[0]
    assert f"redo it with: ftengine export {run_path} --format merged" in result.stderr
    from ftengine.engine.rundir import RunDir

    state = RunDir(run_path).status()
    assert state["status"] == "exports_failed" and state["training"] == "completed"
    assert list(state["exports_done"]) == ["lora"]

    monkeypatch.undo()
    resumed = pipeline.run(config, run_dir=RunDir(run_path), resume=True)
    assert list(resumed.exports) == ["merged"] and resumed.run_dir.status()["status"] == "completed"
    assert set(resumed.run_dir.status()["summary"]["exports"]) == {"lora", "merged"}


def test_an_unknown_trainer_in_the_api_leaves_no_run_directory(tmp_path, monkeypatch):
    import ftengine
    from ftengine.core.errors import PluginError

    monkeypatch.chdir(tmp_path)
    with pytest.raises(PluginError, match="sftt"):
        ftengine.train(None, None, None, trainer="sftt", output_dir=str(tmp_path / "run"))
    with pytest.raises(PluginError):
        ftengine.train(None, None, None, trainer="sftt")
    assert list(tmp_path.iterdir()) == []


def test_out_of_memory_at_adapter_creation_is_one_line(tmp_path, demo_base, monkeypatch):
    import torch

    from ftengine.demo import ASSETS
    from ftengine.engine import pipeline

    def out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(pipeline, "adapt", out_of_memory)
    path = write_config(tmp_path, demo_base, ASSETS / "data.jsonl")
    assert_one_line_error(cli("run", str(path)), "out of memory (OutOfMemoryError: CUDA out of memory",
                          "per_device_train_batch_size", "--debug")
    (run,) = (tmp_path / "runs").iterdir()
    assert json.loads((run / "run.json").read_text())["error"].startswith("out of memory")
