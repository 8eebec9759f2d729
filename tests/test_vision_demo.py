"""The vision demo's promise at a shorter run: the loss falls and the trained model, reloaded from its
merged export, reads the formula images closer to their LaTeX than the untrained model does."""

import os

import pytest

from ftengine.engine import pipeline


@pytest.mark.slow
def test_vision_demo_learns_to_read_formulas(tmp_path_factory, one_thread):
    os.environ.setdefault("FTENGINE_CACHE", str(tmp_path_factory.mktemp("ftengine-cache")))
    from ftengine.demo.vision import base_model_dir
    from ftengine.demo.vision import read_formulas
    from ftengine.demo.vision import similarity
    from ftengine.demo.vision import vision_demo_config

    config = vision_demo_config(max_steps=60)
    config.output.dir = str(tmp_path_factory.mktemp("runs"))
    result = pipeline.run(config)
    assert result.train.last_loss <= 0.25 * result.train.first_loss, result.train.losses
    before = similarity(read_formulas(base_model_dir()))
    after = similarity(read_formulas(result.exports["merged"][0]))
    assert after > before + 0.2, (before, after)
