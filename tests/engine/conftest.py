"""Fixtures of the engine tests that several modules share."""

from __future__ import annotations

import os

import pytest

from tests import mllama_checkpoint


@pytest.fixture(scope="session")
def mllama_base(tmp_path_factory):
    """A tiny Llama 3.2 Vision checkpoint with its processor (random weights)."""
    return mllama_checkpoint.build(tmp_path_factory.mktemp("mllama") / "tiny-mllama")


@pytest.fixture(scope="session")
def formula_images(tmp_path_factory):
    """The vision demo's formula images and their ``data.jsonl`` (image path, LaTeX)."""
    os.environ.setdefault("FTENGINE_CACHE", str(tmp_path_factory.mktemp("ftengine-cache")))
    from ftengine.demo.vision import data_dir

    return data_dir()


