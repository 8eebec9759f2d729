"""``scripts/check_one_gpu.py``: ``torchrun --nproc-per-node 1`` trains through the run pipeline with
the configured strategy, the patched model's kernel ops on the expected backend, and the loss falls.
On a GPU: ddp, fsdp and QLoRA under fsdp on the Triton backend; on the CPU: ddp over gloo."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.child_env import child_env

SCRIPT = Path(__file__).parents[2] / "scripts" / "check_one_gpu.py"


def run_check(tmp_path, device):
    out = tmp_path / "one.jsonl"
    env = child_env()
    done = subprocess.run([sys.executable, str(SCRIPT), "--device", device, "--out", str(out)], env=env,
                          capture_output=True, text=True, timeout=600)
    rows = [json.loads(line) for line in out.read_text().splitlines()] if out.exists() else []
    return done, rows


@pytest.mark.gpu
def test_one_gpu_ddp_fsdp_and_qlora_fsdp_run_the_triton_ops_and_learn(tmp_path):
    done, rows = run_check(tmp_path, "gpu")
    assert done.returncode == 0, done.stdout + done.stderr[-3000:]
    assert [r["check"] for r in rows] == ["ddp", "fsdp", "qlora-fsdp"]
    assert all(r["status"] == "ok" for r in rows)
    assert [r["sharded"] for r in rows] == [False, True, True]
    assert set(rows[2]["routes"]) == {"lora+nf4"}


@pytest.mark.slow
def test_one_process_under_torchrun_trains_with_its_strategy_on_the_cpu(tmp_path):
    done, rows = run_check(tmp_path, "cpu")
    assert done.returncode == 0, done.stdout + done.stderr[-3000:]
    (row,) = rows
    assert row["check"] == "ddp" and row["status"] == "ok"
    assert any(n.startswith("distributed: ddp over 1 processes (gloo") for n in row["notes"])
    assert row["losses"][-1] < row["losses"][0]
