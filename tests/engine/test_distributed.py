"""Training on several processes: CPU processes over gloo, launched by ``ftengine run`` itself
(``distributed.num_processes``), compared with one process training the same global batch.

Each launch costs a few interpreter start-ups, so the checks of one launch are combined; the
fast representative (DDP, one epoch, exports) runs by default, interruption, resume and a dying
rank are marked ``slow``.
"""

import json
import shutil
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
from ftengine.engine.exporting import export_all
from ftengine.engine.launch import first_failure
from ftengine.engine.rundir import CHECKPOINT_MARKER
from ftengine.engine.rundir import RunDir
from tests.child_env import child_env
from tests.plugins.models.moe_helpers import tiny_qwen3_moe_checkpoint


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
    env = child_env(extra_pythonpath, OMP_NUM_THREADS="1")
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
    """One epoch on 2 processes (gradient checkpointing on): the loss curve of one process with the
    same global batch, every sample seen once, one run directory written by rank 0, exports equal
    to one process's export of the same weights."""
    raw = raw_config(demo_base, tmp_path, max_steps=-1, num_train_epochs=1, gradient_checkpointing=True)
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
    assert json.loads((checkpoint / distributed.CHECKPOINT_INFO).read_text()) == {"world_size": 2, "strategy": "ddp",
                                                                                 "global_batch": 4}
    assert sorted(p.name for p in checkpoint.glob("rng_state_*.pth")) == ["rng_state_0.pth", "rng_state_1.pth"]

    # the exports of rank 0 == one process exporting the checkpoint's weights
    model, tokenizer, _, _ = load_for_export(checkpoint, ("lora",), None)
    export_all(model, tokenizer, validate_config(raw).export, tmp_path / "again")
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


INJECT = '''
import os
import time

if os.environ.get("WORLD_SIZE"):
    from ftengine.engine import progress

    original = progress.ProgressCallback.on_log
    mode, rank, step = os.environ["INJECT"].split(":")

    def on_log(self, args, state, control, logs=None, **kwargs):
        if mode == "fail" and os.environ["RANK"] == rank and state.global_step == int(step):
            raise RuntimeError("injected failure")
        original(self, args, state, control, logs=logs, **kwargs)
        if mode == "slow":
            time.sleep(float(step))

    progress.ProgressCallback.on_log = on_log
'''


def test_ddp_trains_a_mixture_of_experts_with_4_bit_experts_like_one_process(tmp_path):
    """QLoRA on a Qwen3-MoE over 2 processes: the experts stored NF4 on each rank (not parameters, so never
    broadcast, and packed alike from the same checkpoint), the loss curve of one process with the same global
    batch (the router loss weighed once a step: within its nonlinearity in the batch)."""
    base = tiny_qwen3_moe_checkpoint(tmp_path / "moe")
    raw = raw_config(base, tmp_path, max_steps=4)
    raw["quantization"] = {"load_in_4bit": True, "bnb_4bit_compute_dtype": "float32"}
    code, out, err = launch_cli([str(write_yaml(raw, tmp_path / "config.yaml"))], tmp_path)
    assert code == 0, err[-3000:]
    (run,) = (tmp_path / "runs").glob("tiny-*")
    notes = json.loads((run / "run.json").read_text())["summary"]["notes"]
    assert any("moe experts x2 stored NF4" in n for n in notes) and any("ddp over 2 processes" in n for n in notes)
    single = one_process_twin(raw)
    got, expected = losses(run), single.train.losses
    assert [s for s, _ in got] == [s for s, _ in expected] == [1, 2, 3, 4]
    for (_, a), (_, b) in zip(got, expected, strict=True):
        assert a == pytest.approx(b, abs=5e-4)


def injecting(tmp_path, monkeypatch, what):
    """A ``sitecustomize`` for the launched ranks: ``slow:-:seconds`` sleeps after each logged step,
    ``fail:rank:step`` raises on one rank at one step."""
    folder = tmp_path / "inject"
    folder.mkdir(exist_ok=True)
    (folder / "sitecustomize.py").write_text(INJECT)
    monkeypatch.setenv("INJECT", what)
    return str(folder)


@pytest.mark.slow
@pytest.mark.slow
def test_sigterm_to_the_launcher_then_resume_continues_exactly(demo_base, tmp_path, monkeypatch):
    raw = raw_config(demo_base, tmp_path, max_steps=8, save_steps=2)
    proc = launch_cli([str(write_yaml(raw, tmp_path / "config.yaml"))], tmp_path,
                      extra_pythonpath=injecting(tmp_path, monkeypatch, "slow:-:1.0"), wait=False)
    deadline = time.time() + 500
    while time.time() < deadline:
        runs = list((tmp_path / "runs").glob("tiny-*"))
        if runs and len(RunDir(runs[0]).read_metrics()) >= 3:
            break
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 130, err[-3000:]
    assert "resume with: ftengine run --resume" in err
    run = RunDir(runs[0])
    assert run.status()["status"] == "interrupted"
    cut = run.latest_checkpoint()
    stopped_at = int(cut.name.split("-")[1])
    assert 3 <= stopped_at < 8 and len(run.read_metrics()) == stopped_at

    monkeypatch.delenv("INJECT")
    code, out, err = launch_cli(["--resume", str(run.path)], tmp_path)
    assert code == 0, err[-3000:]
    assert run.status()["status"] == "completed"
    single = one_process_twin(raw)
    got = losses(run.path)
    assert [s for s, _ in got] == list(range(1, 9))
    for (_, a), (_, b) in zip(got, single.train.losses, strict=True):
        assert a == pytest.approx(b, abs=1e-4)


@pytest.mark.slow
def test_a_dying_rank_stops_every_rank_with_its_error_and_one_process_resumes(demo_base, tmp_path, monkeypatch):
    raw = raw_config(demo_base, tmp_path, max_steps=12, save_steps=1)
    start = time.time()
    code, out, err = launch_cli([str(write_yaml(raw, tmp_path / "config.yaml"))], tmp_path,
                                extra_pythonpath=injecting(tmp_path, monkeypatch, "fail:1:3"))
    assert code == 1
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert errors == ["error: rank 1: RuntimeError: injected failure"], err[-3000:]
    (path,) = (tmp_path / "runs").glob("tiny-*")
    run = RunDir(path)
    assert run.status()["status"] == "failed" and "rank 1" in run.status()["error"]
    checkpoint = run.latest_checkpoint()
    assert checkpoint.name == "checkpoint-2" and (checkpoint / CHECKPOINT_MARKER).exists()
    assert time.time() - start < 300

    # resumed on one process (the run's config edited, as `--gpus 1` does on a GPU host): it accumulates
    # two batches of 2 to keep the global batch of 4, and continues as one process trained from the start
    monkeypatch.delenv("INJECT")
    resumed = yaml.safe_load(run.config_path.read_text())
    resumed["distributed"]["num_processes"] = 1
    run.config_path.write_text(yaml.safe_dump(resumed))
    code, out, err = launch_cli(["--resume", str(path)], tmp_path)
    assert code == 0, err[-3000:]
    status = run.status()
    assert status["status"] == "completed"
    assert ("resumed on 1 process(es): gradient_accumulation_steps 1 -> 2 keeps the global batch of 4"
            in status["summary"]["notes"])
    got, expected = losses(path), one_process_twin(raw).train.losses
    assert [s for s, _ in got] == [s for s, _ in expected] == list(range(1, 13))
    for (_, a), (_, b) in zip(got, expected, strict=True):
        assert a == pytest.approx(b, abs=1e-4)


def test_gpus_beyond_the_visible_ones_is_one_line_before_anything_starts(demo_base, tmp_path):
    from click.testing import CliRunner

    from ftengine.cli import main

    config = write_yaml(raw_config(demo_base, tmp_path, processes=1), tmp_path / "config.yaml")
    result = CliRunner().invoke(main, ["run", "--gpus", "2", str(config)])
    assert result.exit_code == 1
    assert result.output.strip().splitlines()[-1] == "error: --gpus 2: only 0 CUDA GPU(s) visible"
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("key, value, problem", [
    ("quantization", {"load_in_8bit": True}, "distributed.strategy: fsdp cannot shard an 8-bit"),
    ("model", {"offload_embedding": True}, "model.offload_embedding: the input embedding cannot stay"),
])
def test_a_strategy_that_cannot_serve_the_request_is_a_config_error(demo_base, tmp_path, key, value, problem):
    raw = raw_config(demo_base, tmp_path)
    raw["distributed"]["strategy"] = "fsdp"
    raw.setdefault(key, {}).update(value)
    with pytest.raises(ConfigError, match=problem):
        validate_config(raw)


def test_fsdp_is_refused_for_4_bit_experts_before_anything_loads(tmp_path, monkeypatch):
    """FSDP cannot shard the stand-ins of experts stored NF4 (``fully_shard`` refuses their zero strides): an
    explicit fsdp is one line naming the fix, ``auto`` picks ddp, and the Python API refuses such a model."""
    from ftengine.core.kernels import get_op
    from ftengine.engine.pipeline import load_model_config
    from ftengine.plugins.models import _moe

    base = tiny_qwen3_moe_checkpoint(tmp_path / "moe")
    hf_config = load_model_config(str(base))
    raw = raw_config(base, tmp_path)
    raw["quantization"] = {"load_in_4bit": True}
    four_bit = validate_config(raw)
    with pytest.raises(ConfigError, match="fsdp cannot shard the experts of a mixture of experts"):
        distributed.check_strategy("fsdp", four_bit, on_gpu=True, hf_config=hf_config)
    assert distributed.choose_strategy(four_bit, hf_config, 2, memory=2**20, on_gpu=True)[0] == "ddp"
    sixteen_bit = validate_config(raw_config(base, tmp_path))
    assert distributed.choose_strategy(sixteen_bit, hf_config, 2, memory=2**20, on_gpu=True)[0] == "fsdp"

    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(base))
    assert _moe.quantize_experts(model, get_op, ("Qwen3MoeSparseMoeBlock",)) == 2
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    with pytest.raises(ConfigError, match="train: strategy fsdp cannot shard the experts"):
        distributed.api_trainer_arguments("fsdp", model)


def test_strategy_choice(demo_base, tmp_path):
    from ftengine.engine.pipeline import load_model_config

    hf_config = load_model_config(str(demo_base))
    config = validate_config(raw_config(demo_base, tmp_path))
    assert distributed.choose_strategy(config, hf_config, 2, memory=2**30, on_gpu=True)[0] == "ddp"
    assert distributed.choose_strategy(config, hf_config, 2, memory=2**20, on_gpu=True)[0] == "fsdp"
    assert distributed.choose_strategy(config, hf_config, 2, memory=2**20, on_gpu=False)[0] == "ddp"
    fsdp = validate_config({**raw_config(demo_base, tmp_path), "distributed": {"num_processes": 2,
                                                                               "strategy": "fsdp"}})
    with pytest.raises(ConfigError, match="fsdp needs CUDA GPUs"):
        distributed.choose_strategy(fsdp, hf_config, 2, on_gpu=False)
    assert distributed.choose_strategy(fsdp, hf_config, 2, on_gpu=True)[1].startswith("fsdp over 2 processes (nccl")


def test_memory_plan_counts_the_model_and_its_lora_weights(tiny_config):
    """The plan's parameter counts against the model peft actually builds."""
    config = tiny_config()
    loaded = pipeline.load_adapted(config)
    hf_config = loaded.model.config
    total = sum(p.numel() for p in loaded.model.parameters())
    trainable = sum(p.numel() for p in loaded.model.parameters() if p.requires_grad)
    assert distributed.lora_parameters(hf_config, config.lora.r) == trainable
    assert distributed.count_parameters(hf_config) == total - trainable
    plan = distributed.memory_plan(total - trainable, trainable, 2, 4)
    assert plan.replicated_bytes == (total - trainable) * 2 + trainable * 16
    assert plan.sharded_bytes == -(-plan.replicated_bytes // 4)
    nf4 = distributed.memory_plan(8_000_000_000, 0, 2, 2, load_in_4bit=True)
    assert 0.5 * 8e9 < nf4.replicated_bytes < 0.51 * 8e9


def test_resume_keeps_the_global_batch_on_another_number_of_ddp_processes(tmp_path):
    distributed.write_checkpoint_info(tmp_path, 2, "ddp", 8)  # 2 processes x 2 per device x 2 accumulated
    assert distributed.check_resume(tmp_path, 2, "ddp", 2, 2) == 2
    assert distributed.check_resume(tmp_path, 1, "single", 2, 2) == 4
    assert distributed.check_resume(tmp_path, 4, "ddp", 2, 2) == 1
    assert distributed.check_resume(tmp_path, 8, "ddp", 1, 2) == 1
    with pytest.raises(FtengineError, match="global batch of 8 samples, which 4 process.*per_device_train_batch_size 4 "
                                            "cannot make up; resume with --gpus 2, or a per_device_train_batch_size "
                                            "that divides 2"):
        distributed.check_resume(tmp_path, 4, "ddp", 4, 1)
    with pytest.raises(FtengineError, match="set distributed.strategy: ddp"):
        distributed.check_resume(tmp_path, 2, "fsdp")
    with pytest.raises(FtengineError, match="fsdp checkpoints hold each process's shard: resume with --gpus 2"):
        distributed.check_resume(tmp_path, 4, "fsdp", 1, 2)
    sharded = tmp_path / "sharded"
    sharded.mkdir()
    distributed.write_checkpoint_info(sharded, 4, "fsdp", 8)
    with pytest.raises(FtengineError, match="written by 4 process.*with fsdp, resumed with 2 with ddp"):
        distributed.check_resume(sharded, 2, "ddp", 2, 2)
    older = tmp_path / "older"  # a checkpoint that recorded no global batch
    older.mkdir()
    (older / distributed.CHECKPOINT_INFO).write_text(json.dumps({"world_size": 2, "strategy": "ddp"}))
    with pytest.raises(FtengineError, match="without its global batch; resume with --gpus 2"):
        distributed.check_resume(older, 1, "single", 2, 1)


def test_resume_config_changes_only_the_accumulation(demo_base, tmp_path):
    config = validate_config(raw_config(demo_base, tmp_path))  # 2 per device, no accumulation
    distributed.write_checkpoint_info(tmp_path, 2, "ddp", 4)
    assert distributed.resume_config(config, tmp_path, 2, "ddp") == (config, None)
    resumed, note = distributed.resume_config(config, tmp_path, 1, "single")
    assert resumed.training.gradient_accumulation_steps == 2
    assert resumed.model_dump() == {**config.model_dump(), "training": {**config.training.model_dump(),
                                                                        "gradient_accumulation_steps": 2}}
    assert note == "resumed on 1 process(es): gradient_accumulation_steps 1 -> 2 keeps the global batch of 4"


def test_a_checkpoint_saved_quantized_by_bitsandbytes_is_not_sharded(demo_base, tmp_path):
    """A 4-bit checkpoint packed in uint8 (or an 8-bit one) cannot be split by fsdp: one line naming it;
    ``auto`` picks ddp; a 4-bit checkpoint stored in bf16 (what an fsdp run saves) shards."""
    from ftengine.engine.pipeline import load_model_config

    saved = tmp_path / "saved-4bit"
    shutil.copytree(demo_base, saved)
    spec = json.loads((saved / "config.json").read_text())
    config = validate_config({**raw_config(saved, tmp_path), "distributed": {"num_processes": 2, "strategy": "fsdp"}})
    auto = validate_config(raw_config(saved, tmp_path))
    for quantization, problem in (({"load_in_4bit": True, "bnb_4bit_quant_storage": "uint8"}, "4-bit packed in uint8"),
                                  ({"load_in_4bit": True}, "4-bit packed in uint8"),
                                  ({"load_in_8bit": True}, "8-bit \\(LLM.int8\\)"),
                                  ({"load_in_4bit": True, "bnb_4bit_quant_storage": "bfloat16"}, None)):
        (saved / "config.json").write_text(json.dumps({**spec, "quantization_config": {
            "quant_method": "bitsandbytes", **quantization}}))
        hf_config = load_model_config(str(saved))
        if problem is None:
            assert distributed.choose_strategy(config, hf_config, 2, on_gpu=True)[0] == "fsdp"
            assert distributed.choose_strategy(auto, hf_config, 2, memory=2**20, on_gpu=True)[0] == "fsdp"
            continue
        with pytest.raises(ConfigError, match=f"fsdp cannot shard {saved}: its weights are saved {problem}; use ddp"):
            distributed.choose_strategy(config, hf_config, 2, on_gpu=True)
        assert distributed.choose_strategy(auto, hf_config, 2, memory=2**20, on_gpu=True)[0] == "ddp"


def test_nccl_missing_on_a_gpu_host_is_one_line_before_anything_starts(demo_base, tmp_path, monkeypatch):
    from click.testing import CliRunner

    from ftengine.cli import main

    config = write_yaml(raw_config(demo_base, tmp_path, processes=1), tmp_path / "config.yaml")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.distributed, "is_nccl_available", lambda: False)
    result = CliRunner().invoke(main, ["run", "--gpus", "2", str(config)])
    assert result.exit_code == 1
    assert result.output.strip().splitlines()[-1].startswith("error: distributed training on GPUs needs NCCL, which "
                                                             "this PyTorch build lacks")
    assert not (tmp_path / "runs").exists()


def test_nccl_missing_is_one_line(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.distributed, "is_nccl_available", lambda: False)
    with pytest.raises(FtengineError, match="needs NCCL, which this PyTorch build lacks"):
        distributed.check_backend()


def test_other_ranks_write_nothing_to_the_run_directory(tmp_path):
    reader = RunDir(tmp_path, writer=False)
    reader.set_status("running")
    reader.write_text("config.yaml", "model: {}\n")
    reader.truncate_metrics(0)
    assert list(tmp_path.iterdir()) == []


def test_the_first_failing_rank_with_an_error_is_reported():
    from torch.distributed.elastic.multiprocessing.errors import ProcessFailure

    def failure(rank, message, timestamp, exitcode=1):
        f = ProcessFailure.__new__(ProcessFailure)
        f.local_rank, f.pid, f.exitcode, f.error_file = rank, 1, exitcode, ""
        f.message, f.timestamp = message, timestamp
        return f

    stopped = failure(0, "To enable traceback see: ...", 5, exitcode=-15)
    assert first_failure({0: stopped, 1: failure(1, {"message": "RuntimeError: boom"}, 9)}) == \
        "rank 1: RuntimeError: boom"
    assert first_failure({0: stopped}) == "rank 0: stopped by SIGTERM"


@pytest.mark.slow
def test_fsdp_sharded_weights_gathered_to_rank_0_export_like_one_process(demo_base, tmp_path):
    raw = raw_config(demo_base, tmp_path)
    raw["export"] = [{"format": "lora"}, {"format": "merged", "dtype": "float16"},
                     {"format": "gguf", "quantization": "f16"}]
    config = write_yaml(raw, tmp_path / "config.yaml")
    worker = Path(__file__).parent / "fsdp_export_worker.py"
    env = child_env(OMP_NUM_THREADS="1")
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           str(worker), str(config), str(tmp_path / "out")], env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    gathered, reference = tmp_path / "out" / "gathered", tmp_path / "out" / "reference"
    for name, file in (("lora", "adapter_model.safetensors"), ("merged", "model.safetensors")):
        ours, theirs = load_file(gathered / name / file), load_file(reference / name / file)
        assert ours.keys() == theirs.keys()
        assert all(torch.equal(ours[k], theirs[k]) for k in ours)
    (ours,) = (gathered / "gguf").glob("*.gguf")
    (theirs,) = (reference / "gguf").glob("*.gguf")
    assert ours.read_bytes() == theirs.read_bytes()


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs")
def test_fsdp_on_two_gpus_trains_like_one_checkpoints_sharded_and_resumes(demo_base, tmp_path):
    raw = raw_config(demo_base, tmp_path, max_steps=4, save_steps=2, gradient_checkpointing=True)
    raw["distributed"]["strategy"] = "fsdp"
    raw["export"] = [{"format": "lora"}]
    code, out, err = launch_cli([str(write_yaml(raw, tmp_path / "config.yaml"))], tmp_path)
    assert code == 0, err[-3000:]
    (path,) = (tmp_path / "runs").glob("tiny-*")
    run = RunDir(path)
    assert any("fsdp over 2 processes (nccl" in n for n in run.status()["summary"]["notes"])
    checkpoint = run.latest_checkpoint()
    assert any(p.is_dir() and p.name.startswith("pytorch_model_fsdp") for p in checkpoint.iterdir())  # DCP shards
    single = one_process_twin(raw)
    full = losses(path)
    for (_, a), (_, b) in zip(full, single.train.losses, strict=True):
        assert a == pytest.approx(b, abs=1e-4)
    exported = load_file(path / "exports" / "lora" / "adapter_model.safetensors")
    reference = load_file(single.run_dir.exports / "lora" / "adapter_model.safetensors")
    assert exported.keys() == reference.keys()
    for key in exported:
        torch.testing.assert_close(exported[key], reference[key], atol=1e-4, rtol=1e-3)

    # resume from the sharded checkpoint-2: steps 3 and 4 again, as before
    (checkpoint / CHECKPOINT_MARKER).unlink()
    shutil.rmtree(path / "exports")
    code, out, err = launch_cli(["--resume", str(path)], tmp_path)
    assert code == 0, err[-3000:]
    for (_, a), (_, b) in zip(losses(path), full, strict=True):
        assert a == pytest.approx(b, abs=1e-5)


@pytest.mark.slow
def test_the_python_api_under_torchrun_trains_data_parallel(demo_base, tmp_path):
    from ftengine.demo import ASSETS

    worker = Path(__file__).parent / "api_worker.py"
    env = child_env(OMP_NUM_THREADS="1")
    args = [str(worker), str(demo_base), str(ASSETS / "data.jsonl")]
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           *args, str(tmp_path / "two"), "2"], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    single = subprocess.run([sys.executable, *args, str(tmp_path / "one"), "4"], env=env, capture_output=True,
                            text=True, timeout=600)
    assert single.returncode == 0, single.stderr[-3000:]
    two, one = losses(tmp_path / "two" / "run"), losses(tmp_path / "one" / "run")
    assert [s for s, _ in two] == [1, 2, 3]  # rank 0 alone wrote the metrics
    for (_, a), (_, b) in zip(two, one, strict=True):
        assert a == pytest.approx(b, abs=1e-4)
    ours = load_file(tmp_path / "two" / "lora" / "adapter_model.safetensors")
    theirs = load_file(tmp_path / "one" / "lora" / "adapter_model.safetensors")
    assert ours.keys() == theirs.keys()
    for key in ours:
        torch.testing.assert_close(ours[key], theirs[key], atol=1e-4, rtol=1e-3)
