"""``loss.png``: the curves of a run's ``metrics.jsonl``, one panel per quantity.

Every run gets the training loss (and the eval loss where there is one). A run whose records
carry a reward (GRPO and the other RL trainers) also gets the mean reward with a band of one
standard deviation and each reward function's own mean, so a rising correctness reward can be
told from a rising format reward; and, where logged, the KL to the reference and the mean
completion length.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class Curve:
    """One line of a panel: ``values[i]`` at ``steps[i]``, with an optional ``+/- band[i]``."""

    label: str
    steps: list[float]
    values: list[float]
    band: list[float] | None = None


def _curve(records: list[dict[str, Any]], key: str, label: str, band_key: str | None = None) -> Curve | None:
    rows = [m for m in records if isinstance(m.get(key), (int, float)) and "step" in m]
    if not rows:
        return None
    band = None
    if band_key and all(isinstance(m.get(band_key), (int, float)) for m in rows):
        band = [float(m[band_key]) for m in rows]
    return Curve(label, [m["step"] for m in rows], [float(m[key]) for m in rows], band)


def reward_function_names(records: list[dict[str, Any]]) -> list[str]:
    """The reward functions trl logged (``rewards/<name>/mean``), in first-seen order."""
    names: dict[str, None] = {}
    for record in records:
        for key in record:
            if key.startswith("rewards/") and key.endswith("/mean") and key.count("/") == 2:
                names[key.split("/")[1]] = None
    return list(names)


def panels(records: list[dict[str, Any]]) -> dict[str, list[Curve]]:
    """The panels of ``loss.png`` (title -> curves) from the logged records; empty panels left out.

    Args:
        records: the rows of ``metrics.jsonl``.
    """
    training = [m for m in records if "eval_loss" not in m]  # an evaluation's own row carries only eval_*
    candidates = {
        "loss": [_curve(training, "loss", "train"), _curve(records, "eval_loss", "eval")],
        "reward": [_curve(training, "reward", "mean reward (\u00b1 std)", band_key="reward_std"),
                   *(_curve(training, f"rewards/{name}/mean", name) for name in reward_function_names(training))],
        "KL to the reference": [_curve(training, "kl", "kl")],
        "completion length": [_curve(training, "completion_length", "mean tokens")],
    }
    return {title: [c for c in curves if c is not None] for title, curves in candidates.items()
            if any(c is not None for c in curves)}


def metrics_figure(records: list[dict[str, Any]], title: str) -> Any:
    """A matplotlib figure of :func:`panels` side by side (``None`` when nothing was logged)."""
    chosen = panels(records)
    if "loss" not in chosen:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(chosen), figsize=(6 * len(chosen), 4), dpi=100, squeeze=False)
    for ax, (name, curves) in zip(axes[0], chosen.items(), strict=True):
        for curve in curves:
            (line,) = ax.plot(curve.steps, curve.values, marker="." if len(curve.steps) < 60 else None,
                              label=curve.label)
            if curve.band is not None:
                low = [v - b for v, b in zip(curve.values, curve.band, strict=True)]
                high = [v + b for v, b in zip(curve.values, curve.band, strict=True)]
                ax.fill_between(curve.steps, low, high, color=line.get_color(), alpha=0.2)
        if len(curves) > 1:
            ax.legend(fontsize="small")
        ax.set_xlabel("step")
        ax.set_ylabel(name)
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def write_plot(records: list[dict[str, Any]], out: Path, tmp: Path, title: str) -> Path | None:
    """Draw :func:`metrics_figure` to ``out`` through ``tmp`` (an atomic replace)."""
    fig = metrics_figure(records, title)
    if fig is None:
        return None
    import matplotlib.pyplot as plt

    fig.savefig(tmp, format="png")
    plt.close(fig)
    tmp.replace(out)
    return out
