"""Learning curves from run directories: read metrics.jsonl, plot accuracy and loss against images seen or
training time.

A run directory holds `metrics.jsonl` (one JSON object per line, {"step": global step, key: value, ...};
a resumed run may repeat steps, and the last record of a step wins) and `config.yaml` (its global batch
size turns steps into images seen, so runs of different batch sizes share one axis). Training time is the sum
of the logged step times (`perf/step_time_s`, the mean over each logging window): evaluation and start-up are
left out, so runs measured beside different work stay comparable only as far as their step times are.
"""

from __future__ import annotations

import bisect
import json
import math
from dataclasses import dataclass
from pathlib import Path

import yaml

from capsdist.core.errors import ConfigError
from capsdist.core.files import write_figure


@dataclass
class Curves:
    """The series of one run, each a list of (x, value) sorted by x: images seen, or training seconds."""

    label: str
    train_loss: list[tuple[int, float]]
    train_accuracy: list[tuple[int, float]]
    val_accuracy: list[tuple[int, float]]
    test_accuracy: list[tuple[int, float]]


X_AXES = {"images": "images seen", "time": "training time (s)"}


def read_curves(run_dir: str | Path, label: str = "", smooth_steps: int = 50, x: str = "images") -> Curves:
    """The curves of one run against `x` (a key of X_AXES); training loss and accuracy are averaged over windows
    of `smooth_steps` steps."""
    if x not in X_AXES:
        raise ConfigError(f"unknown x axis {x!r}: choose one of {', '.join(X_AXES)}")
    run_dir = Path(run_dir)
    metrics, config = run_dir / "metrics.jsonl", run_dir / "config.yaml"
    if not metrics.is_file() or not config.is_file():
        raise ConfigError(f"{run_dir}: not a run directory (needs metrics.jsonl and config.yaml)")
    batch = int(yaml.safe_load(config.read_text())["train"]["batch_size"])
    series: dict[str, dict[int, float]] = {}
    for line in metrics.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut short by a kill
        for key, value in record.items():
            if key != "step" and isinstance(value, (int, float)) and math.isfinite(value):
                series.setdefault(key, {})[int(record["step"])] = float(value)

    position = (lambda step: step * batch) if x == "images" else _training_seconds(series.get("perf/step_time_s", {}))

    def points(key: str, window: int = 1) -> list[tuple[float, float]]:
        items = sorted(series.get(key, {}).items())
        out = []
        for start in range(0, len(items), window):
            chunk = items[start : start + window]
            out.append((position(chunk[-1][0]), sum(v for _, v in chunk) / len(chunk)))
        return out

    return Curves(
        label or run_dir.name,
        points("train/loss", smooth_steps),
        points("train/accuracy", smooth_steps),
        points("val/accuracy"),
        points("test/accuracy"),
    )


def _training_seconds(step_times: dict[int, float]):
    """step -> training seconds up to that step, from the mean step time of each logging window ending at a
    logged step {step: seconds per step}; a step past the last logged one continues at its rate."""
    if not step_times:
        raise ConfigError("no perf/step_time_s in metrics.jsonl: this run cannot be drawn against training time")
    steps, totals, total, before = [], [], 0.0, 0
    for step, seconds in sorted(step_times.items()):
        total += seconds * (step - before)
        steps.append(step)
        totals.append(total)
        before = step

    def seconds_at(step: int) -> float:
        i = min(bisect.bisect_left(steps, step), len(steps) - 1)
        return totals[i] - step_times[steps[i]] * (steps[i] - step)

    return seconds_at


def plot_curves(runs: list[Curves], out: str | Path, title: str = "", x: str = "images") -> Path:
    """Write a PNG with two panels: accuracy (val solid, test dotted, train faint) and training loss, both
    against `x` (a key of X_AXES, as the runs were read). Returns the path written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (acc_ax, loss_ax) = plt.subplots(1, 2, figsize=(12, 4.5))
    for i, run in enumerate(runs):
        color = f"C{i % 10}"
        for pts, style, alpha, name in (
            (run.val_accuracy, "-o", 1.0, "val"),
            (run.test_accuracy, ":s", 1.0, "test"),
            (run.train_accuracy, "-", 0.3, "train"),
        ):
            if pts:
                xs, ys = zip(*pts)
                acc_ax.plot(xs, ys, style, color=color, alpha=alpha, markersize=3, label=f"{run.label} {name}")
        if run.train_loss:
            xs, ys = zip(*run.train_loss)
            loss_ax.plot(xs, ys, color=color, label=run.label)
    acc_ax.set(xlabel=X_AXES[x], ylabel="accuracy", title="accuracy")
    loss_ax.set(xlabel=X_AXES[x], ylabel="training loss", title="training loss", yscale="log")
    acc_ax.grid(alpha=0.3)
    loss_ax.grid(alpha=0.3)
    acc_ax.legend(fontsize=7)
    loss_ax.legend(fontsize=7)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    path = write_figure(out, fig)
    plt.close(fig)
    return path
