"""Test-wide set-up: offline hub, Triton's CPU interpreter when there is no GPU, only our plugins."""

import os
import tempfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HOME", tempfile.mkdtemp(prefix="ftengine-hf-home-"))
os.environ.setdefault("FTENGINE_LOAD_PLUGINS", "ftengine,ftengine-example-plugin")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Interpreted Triton kernels are for the kernel tests, which call them directly; whole-model runs
# use the reference ops unless a test selects a backend itself.
os.environ.setdefault("FTENGINE_KERNELS", "reference")

import torch  # noqa: E402

if not torch.cuda.is_available():
    # Must be set before any @triton.jit function runs: Triton then interprets kernels on the CPU.
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


def pytest_collection_modifyitems(config, items):
    """Tests marked ``gpu`` skip on machines without CUDA (the one skip rule for GPU tests)."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def one_thread():
    """One intra-op thread for a test's small matmuls, then the worker's setting back for the tests after it."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def demo_base(tmp_path_factory):
    """The demo's tiny Qwen2 base model directory (built once, in a temporary cache)."""
    os.environ["FTENGINE_CACHE"] = str(tmp_path_factory.mktemp("ftengine-cache"))
    from ftengine.demo import base_model_dir

    return base_model_dir()


@pytest.fixture(scope="session")
def grpo_base(demo_base):
    """The GRPO demo's warm-started model directory (built once, in the same temporary cache)."""
    from ftengine.demo import grpo_base_dir

    return grpo_base_dir()


def tiny_run_config(base, data, tmp_path, **training):
    """A few-step LoRA run on the demo model: the shape most pipeline tests need."""
    from ftengine.core.config import validate_config

    return validate_config({
        "model": {"name_or_path": str(base), "max_seq_length": 64, "dtype": "float32"},
        "lora": {"r": 8, "lora_alpha": 16},
        "data": {"path": str(data), "format": "messages", "chat_template": "chatml"},
        "training": {"max_steps": 4, "per_device_train_batch_size": 4, "gradient_accumulation_steps": 1,
                     "learning_rate": 1e-3, "logging_steps": 1, "save_steps": 100, "gradient_checkpointing": False,
                     "seed": 7, **training},
        "export": [],
        "output": {"dir": str(tmp_path / "runs"), "name": "tiny"},
    })


@pytest.fixture(scope="session")
def make_tiny_run_config():
    """:func:`tiny_run_config` for fixtures wider than one test."""
    return tiny_run_config


@pytest.fixture
def tiny_config(demo_base, tmp_path):
    from ftengine.demo import ASSETS

    return lambda **training: tiny_run_config(demo_base, ASSETS / "data.jsonl", tmp_path, **training)


EXAMPLE_PLUGIN = "ftengine-example-plugin"


@pytest.fixture(scope="session")
def example_plugin():
    """The third-party example plugin, pip-installed (as a user would) into this environment."""
    import subprocess
    import sys
    from importlib import metadata
    from pathlib import Path

    try:
        metadata.distribution(EXAMPLE_PLUGIN)
    except metadata.PackageNotFoundError:
        import importlib.util

        source = Path(__file__).parents[1] / "examples" / EXAMPLE_PLUGIN
        isolation = [] if importlib.util.find_spec("setuptools") is None else ["--no-build-isolation"]
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", *isolation, str(source)],
                       check=True)
    from ftengine.core.plugins import reset_registries

    reset_registries()
    yield
    reset_registries()
