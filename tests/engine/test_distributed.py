"""Training on several processes: CPU processes over gloo, launched by ``ftengine run`` itself
(``distributed.num_processes``), compared with one process training the same global batch.

Each launch costs a few interpreter start-ups, so the checks of one launch are combined; the
fast representative (DDP, one epoch, exports) runs by default, interruption, resume and a dying
rank are marked ``slow``.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from ftengine.core.config import validate_config
from ftengine.core.errors import ConfigError
from ftengine.core.errors import FtengineError
from ftengine.engine import distributed
from ftengine.engine import pipeline
from ftengine.engine.export_source import load_for_export
from ftengine.engine.launch import first_failure
from ftengine.engine.rundir import CHECKPOINT_MARKER
from ftengine.engine.rundir import RunDir

ROOT = Path(__file__).parents[2]


def raw_config(base, tmp_path, processes=2, **training):
    from ftengine.demo import ASSETS

    return {
        "model": {"name_or_path": str(base), "max_seq_length": 64, "dtype": "float32"},
        "lora": {"r": 8, "lora_alpha": 16},
        "data": {"path": str(ASSETS / "data.jsonl"), "format": "messages", "chat_template": "chatml",
                 "max_rows": 48},
        "training": {"max_steps": 6, "per_device_train_batch_size": 2, "gradient_accumulation_steps": 1,
                     "learning_rate": 1e-3, "logging_steps": 1, "save_steps": 100, "gradient_checkpointing": False,
                     "seed": 7, **training},
        "export": [],
        "output": {"dir": str(tmp_path / "runs"), "name": "tiny"},
        "distributed": {"num_processes": processes},
    }


def one_process_twin(raw, processes=2):
    """The same run in this process, each optimizer step on the same global batch."""
    single = json.loads(json.dumps(raw))
    single["training"]["per_device_train_batch_size"] *= processes
    single["distributed"]["num_processes"] = 1
    single["output"]["name"] = "single"
    return pipeline.run(validate_config(single))


def launch_cli(args, tmp_path, extra_pythonpath=None, wait=True):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [extra_pythonpath, str(ROOT)])),
               OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, "-m", "ftengine", "run", *args], env=env, cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if not wait:
        return proc
    out, err = proc.communicate(timeout=600)
    return proc.returncode, out, err


def write_yaml(raw, path):
    path.write_text(yaml.safe_dump(raw))
    return path


def losses(run_dir):
    return [(m["step"], m["loss"]) for m in RunDir(run_dir).read_metrics()]


def test_ddp_two_processes_train_like_one_and_export_the_same(demo_base, tmp_path):
    """One epoch on 2 processes: the loss curve of one process with the same global batch, every
    sample seen once, one run directory written by rank 0, exports equal to one process's export
    of the same weights."""
    raw = raw_config(demo_base, tmp_path, max_steps=-1, num_train_epochs=1)
    raw["export"] = [{"format": "lora"}, {"format": "merged", "dtype": "float16"}]
    code, out, err = launch_cli([str(write_yaml(raw, tmp_path / "config.yaml"))], tmp_path)
    assert code == 0, err[-3000:]
    (run,) = (tmp_path / "runs").glob("tiny-*")
    single = one_process_twin(raw)

    got, expected = losses(run), single.train.losses
    assert [s for s, _ in got] == [s for s, _ in expected] == list(range(1, 13))  # 48 samples / 4 a step
    for (_, a), (_, b) in zip(got, expected, strict=True):
        assert a == pytest.approx(b, abs=1e-4)
    metrics = RunDir(run).read_metrics()
    report = json.loads((run / "data_report.json").read_text())
    # every sample once: the tokens all ranks saw in the epoch are the dataset's tokens
    assert metrics[-1]["tokens_seen"] == report["tokens"] == single.run_dir.read_metrics()[-1]["tokens_seen"]
    assert all(len(m["peak_memory_gib"]) == 2 for m in metrics)
    status = json.loads((run / "run.json").read_text())
    assert status["status"] == "completed" and len(status["summary"]["memory"]["ranks"]) == 2
    assert any(n.startswith("distributed: ddp over 2 processes (gloo") for n in status["summary"]["notes"])
    assert "rank 0:" in out and "rank 1:" in out and out.count("run directory") == 1
    checkpoint = RunDir(run).latest_checkpoint()
    assert json.loads((checkpoint / distributed.CHECKPOINT_INFO).read_text()) == {"world_size": 2, "strategy": "ddp"}
    assert sorted(p.name for p in checkpoint.glob("rng_state_*.pth")) == ["rng_state_0.pth", "rng_state_1.pth"]

    # the exports of rank 0 == one process exporting the checkpoint's weights
    model, tokenizer, _, _ = load_for_export(checkpoint, ("lora",), None)
    pipeline.export(model, tokenizer, validate_config(raw).export, tmp_path / "again")
    for name, file in (("lora", "adapter_model.safetensors"), ("merged", "model.safetensors")):
        ours, theirs = load_file(run / "exports" / name / file), load_file(tmp_path / "again" / name / file)
        assert ours.keys() == theirs.keys()
        assert all(torch.equal(ours[k], theirs[k]) for k in ours)
    # and the adapter trained on 2 processes is the adapter trained on one, to float rounding
    single_model = single.model
    state = load_file(run / "exports" / "lora" / "adapter_model.safetensors")
    trained = {k: v for k, v in single_model.named_parameters() if v.requires_grad}
    assert len(trained) == len(state)
    for name, value in trained.items():
        key = name.replace(".default", "")
        torch.testing.assert_close(state[key], value.detach(), atol=1e-4, rtol=1e-3)
