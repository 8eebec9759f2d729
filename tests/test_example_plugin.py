"""The third-party example plugin: discovered through its entry point and used by a run."""

import json

from click.testing import CliRunner

from ftengine.cli import main
from ftengine.engine import pipeline


def test_plugins_lists_it(example_plugin):
    result = CliRunner().invoke(main, ["plugins"])
    assert "qa  (ftengine-example-plugin 0.1.0)  [ok]" in result.output
    assert "formats: qa" in result.output


def test_a_run_uses_its_format(example_plugin, tiny_config, tmp_path):
    data = tmp_path / "qa.jsonl"
    rows = [{"question": f"What is {i} times two?", "answer": f"It is {2 * i}."} for i in range(12)]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    config = tiny_config(max_steps=2)
    config.data.path, config.data.format = str(data), "qa"
    result = pipeline.run(config)
    assert result.data.format == "qa" and result.data.samples == 12
    config.data.format = "auto"
    assert pipeline.run(config).data.format == "qa"


def test_example_plugin_own_tests(example_plugin):
    import pytest

    from ftengine.core.plugins import reset_registries

    reset_registries()
    assert pytest.main(["-q", "-p", "no:cacheprovider", "examples/ftengine-example-plugin/tests"]) == 0
