"""QLoRA under FSDP2 on CPU processes over gloo: the NF4 base weights stored in the compute dtype
shard like every other weight, the model adapter's fused NF4 + LoRA ops still compute every
projection, and two processes train like one process on the same global batch."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from tests.child_env import child_env

WORKER = Path(__file__).parent / "qlora_fsdp_worker.py"


def run_worker(config, out, processes):
    env = child_env(OMP_NUM_THREADS="1")
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={processes}"]
    command = [*(launcher if processes > 1 else [sys.executable]), str(WORKER), str(config), str(out)]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads((out / "result.json").read_text()), load_file(out / "lora.safetensors")


@pytest.mark.slow
def test_qlora_sharded_by_fsdp2_keeps_the_fused_nf4_ops_and_trains_like_one_process(demo_base, tmp_path):
    from ftengine.demo import ASSETS

    raw = {"model": {"name_or_path": str(demo_base), "max_seq_length": 64, "dtype": "float32"},
           "quantization": {"load_in_4bit": True, "bnb_4bit_compute_dtype": "float32"},
           "lora": {"r": 8, "lora_alpha": 16, "lora_dropout": 0.0},
           "data": {"path": str(ASSETS / "data.jsonl"), "format": "messages", "chat_template": "chatml"},
           "training": {"gradient_checkpointing": False}, "export": []}
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(raw))
    two, two_lora = run_worker(config, tmp_path / "two", 2)
    one, one_lora = run_worker(config, tmp_path / "one", 1)

    # the packed bytes of every 4-bit weight are split across the two ranks (FSDP2 pads dim 0 to even)
    assert two["packed"] == one["packed"]
    assert all(two["local"][name] == -(-n // 2) for name, n in two["packed"].items())
    assert all(one["local"][name] == n for name, n in one["packed"].items())
    # every projection, sharded or not, went through the fused LoRA + NF4 ops
    assert two["routes"] == one["routes"] == ["lora+nf4"]
    assert two["losses"] == pytest.approx(one["losses"], abs=1e-5)
    assert two["losses"][-1] < two["losses"][0]
    assert two_lora.keys() == one_lora.keys() and len(one_lora) == 4 * 7 * 2
    for key in one_lora:
        torch.testing.assert_close(two_lora[key], one_lora[key], atol=1e-5, rtol=1e-4)


def test_the_api_stores_a_4bit_base_fsdp_can_shard_under_a_launcher(demo_base, monkeypatch):
    """``ftengine.load_model(load_in_4bit=True)`` under torchrun keeps the packed NF4 bytes in the compute
    dtype (fsdp shards them); loaded outside a launcher they stay uint8, which ``train(strategy="fsdp")``
    refuses with one line before any trainer starts."""
    import ftengine
    from ftengine.core.errors import ConfigError
    from ftengine.engine import distributed

    def packed(model):
        return {p.dtype for p in model.parameters() if type(p).__name__ == "Params4bit"}

    alone, _ = ftengine.load_model(str(demo_base), max_seq_length=64, dtype=torch.float32, load_in_4bit=True)
    for name, value in (("TORCHELASTIC_RUN_ID", "test"), ("MASTER_ADDR", "localhost"), ("WORLD_SIZE", "1")):
        monkeypatch.setenv(name, value)
    launched, _ = ftengine.load_model(str(demo_base), max_seq_length=64, dtype=torch.float32, load_in_4bit=True)
    assert packed(alone) == {torch.uint8} and packed(launched) == {torch.bfloat16}

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # the fsdp arguments are for GPU processes
    with pytest.raises(ConfigError, match=r"train: strategy fsdp cannot shard .*q_proj.*, quantized weights packed "
                                          r"in uint8; call ftengine.load_model"):
        distributed.api_trainer_arguments("fsdp", alone)
    assert distributed.api_trainer_arguments("ddp", alone)["ddp_find_unused_parameters"] is False
    assert distributed.api_trainer_arguments("fsdp", launched)["fsdp_config"]["version"] == 2
