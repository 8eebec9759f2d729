"""loss.png: the panels drawn from metrics.jsonl (the loss; for RL runs the mean reward with its std
band, each reward function's mean, the KL and the completion length), checked by reading back the
data the figure plots, not its pixels."""

from __future__ import annotations

import pytest

from ftengine.engine.loss_plot import metrics_figure
from ftengine.engine.loss_plot import panels
from ftengine.engine.loss_plot import write_plot

GRPO_RECORDS = [
    {"step": s, "loss": 0.1 * s, "reward": 0.2 * s, "reward_std": 0.05 * s, "rewards/format/mean": 0.5,
     "rewards/exact_match/mean": 0.1 * s, "kl": 0.01 * s, "completion_length": 4 - 0.5 * s}
    for s in (1, 2, 3)
] + [{"step": 3, "eval_loss": 0.7}]


def test_grpo_records_get_reward_kl_and_length_panels():
    got = panels(GRPO_RECORDS)
    assert list(got) == ["loss", "reward", "KL to the reference", "completion length"]
    train, evaluation = got["loss"]
    assert (train.steps, train.values) == ([1, 2, 3], pytest.approx([0.1, 0.2, 0.3]))
    assert (evaluation.steps, evaluation.values) == ([3], [0.7])
    mean, fmt, correct = got["reward"]
    assert mean.values == pytest.approx([0.2, 0.4, 0.6]) and mean.band == pytest.approx([0.05, 0.1, 0.15])
    assert (fmt.label, fmt.values, fmt.band) == ("format", [0.5] * 3, None)
    assert (correct.label, correct.values) == ("exact_match", pytest.approx([0.1, 0.2, 0.3]))
    assert got["KL to the reference"][0].values == pytest.approx([0.01, 0.02, 0.03])
    assert got["completion length"][0].values == pytest.approx([3.5, 3.0, 2.5])


def test_the_figure_plots_those_numbers():
    fig = metrics_figure(GRPO_RECORDS, "run")
    loss_ax, reward_ax, kl_ax, length_ax = fig.axes
    assert [ax.get_ylabel() for ax in fig.axes] == ["loss", "reward", "KL to the reference", "completion length"]
    reward_line = reward_ax.get_lines()[0]
    assert list(reward_line.get_xdata()) == [1, 2, 3]
    assert list(reward_line.get_ydata()) == pytest.approx([0.2, 0.4, 0.6])
    (band,) = reward_ax.collections
    vertices = band.get_paths()[0].vertices
    assert vertices[:, 1].min() == pytest.approx(0.15) and vertices[:, 1].max() == pytest.approx(0.75)
    assert [line.get_label() for line in reward_ax.get_lines()] == ["mean reward (\u00b1 std)", "format",
                                                                   "exact_match"]
    assert list(length_ax.get_lines()[0].get_ydata()) == pytest.approx([3.5, 3.0, 2.5])
    assert len(loss_ax.get_lines()) == 2 and not loss_ax.collections


def test_a_supervised_run_gets_the_loss_alone(tmp_path):
    records = [{"step": 1, "loss": 2.0, "learning_rate": 1e-3}, {"step": 2, "loss": 1.5}]
    assert list(panels(records)) == ["loss"]
    out = write_plot(records, tmp_path / "loss.png", tmp_path / ".tmp", "run")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and not (tmp_path / ".tmp").exists()
    assert write_plot([{"step": 1, "learning_rate": 1e-3}], tmp_path / "none.png", tmp_path / ".t", "run") is None
