"""The paper's novel-viewpoint experiment on smallNORB: familiar and novel accuracy of two runs at matched familiar
accuracy.

Both runs train on the training viewpoints of one split (data.viewpoint azimuth: azimuths 300 to 40 degrees;
elevation: the 3 lowest elevations) and keep their checkpoints. Every checkpoint of each run is evaluated on the
test images at the training viewpoints ("familiar", eval split test_familiar) and at the others ("novel", split
test). The matching follows the paper: the run whose last checkpoint has the lower familiar accuracy is the
reference, at that checkpoint; of the other run, the checkpoint whose familiar accuracy is closest to the
reference's is taken (the earliest on a tie), as if that run had been stopped there; the two are then compared on
novel viewpoints. The familiar accuracies are test accuracies, as in the paper: they set the point at which the
models are compared, and are not reported as either model's accuracy. How close the match can be depends on how
often the runs saved checkpoints (checkpoint.every_steps); the table gives the gap.

`train_pair` trains both runs (in this process, one after the other; a run already there is resumed or, if
finished, evaluated once more); `run_viewpoints` evaluates, matches and writes <out>/viewpoints-<split>.json, .md
and .png.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from pathlib import Path

from capsdist.config import load_config
from capsdist.core.errors import ConfigError
from capsdist.experiments.evaluate import OpenRun, open_runs
from capsdist.experiments.output import figure, markdown_table, percent, write_outputs
from capsdist.train import checkpoint

CNN_RECIPE = ("model.size=cnn", "loss.name=categorical_crossentropy", "optim.lr=1e-3")  # docs/results.md, CNN rows
KEEP_EVERY_CHECKPOINT = "checkpoint.keep_last=1000000"  # the matching chooses among all of them


@dataclass(frozen=True)
class Point:
    """One checkpoint of a run, evaluated on familiar and novel viewpoints."""

    step: int
    checkpoint: str
    familiar: float
    novel: float


def train_pair(
    config: str | Path, split: str, out: str | Path, overrides: list[str] = (), cnn_overrides: list[str] = ()
) -> list[tuple[Path, str]]:
    """Train <out>/capsules (the config with `overrides`) and <out>/cnn (the same, then CNN_RECIPE and
    `cnn_overrides`) on the training viewpoints of `split`, keeping every checkpoint; returns [(run dir, label)]."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ConfigError(
            "the viewpoint experiment trains its two runs one after the other in one process; on "
            "several GPUs train each with `accelerate launch launch/train.py --set data.viewpoint=SPLIT "
            f"{KEEP_EVERY_CHECKPOINT} ...` and pass both with --run-dir"
        )
    from capsdist.train.trainer import Trainer  # heavy imports, once the arguments are known good

    runs = []
    for name, extra in (("capsules", ()), ("cnn", (*CNN_RECIPE, *cnn_overrides))):
        run_dir = Path(out) / name
        cfg = load_config(
            config, [KEEP_EVERY_CHECKPOINT, *overrides, *extra, f"data.viewpoint={split}", f"run_dir={run_dir}"]
        )
        Trainer(cfg, source=str(config), resume="auto").fit()
        runs.append((run_dir, name))
    return runs


def checkpoints(run_dir: Path) -> list[Path]:
    """Every step checkpoint of a run that verifies, and `best` when its step is not among them, by step."""
    found = {
        checkpoint.read_state(path).step: path
        for _, path in checkpoint.step_dirs(run_dir)
        if checkpoint.verify(path) is None
    }
    best = checkpoint.checkpoint_dir(run_dir) / "best"
    if checkpoint.verify(best) is None:
        found.setdefault(checkpoint.read_state(best).step, best)
    return [found[step] for step in sorted(found)]


def evaluate_checkpoints(run: OpenRun, label: str) -> tuple[list[Point], dict[str, int]]:
    """Familiar and novel accuracy of every checkpoint of `run`, by step; and the number of images of each."""
    points, counts = [], {}
    for path in checkpoints(run.run_dir):
        _, step = run.load(str(path))
        familiar, novel = run.evaluate("test_familiar", step), run.evaluate("test", step)
        counts = {"familiar": familiar["count"], "novel": novel["count"]}
        points.append(Point(step, str(path), familiar["accuracy"], novel["accuracy"]))
        print(f"{label} step {step}: familiar {percent(familiar['accuracy'])}, novel {percent(novel['accuracy'])}")
    if not points:
        raise ConfigError(f"{checkpoint.checkpoint_dir(run.run_dir)}: no usable checkpoint; train the run first")
    return points, counts


def match(curves: dict[str, list[Point]]) -> tuple[str, dict[str, Point]]:
    """(reference label, {label: chosen point}) for two runs' checkpoint curves, each in step order: the reference
    is the run whose last checkpoint is less accurate on familiar viewpoints, taken at that checkpoint; the other run
    at its checkpoint closest to that familiar accuracy (the earliest on a tie)."""
    (first, first_curve), (second, second_curve) = curves.items()
    reference, other = (first, second) if first_curve[-1].familiar <= second_curve[-1].familiar else (second, first)
    target = curves[reference][-1].familiar
    chosen = min(curves[other], key=lambda p: (abs(p.familiar - target), p.step))
    return reference, {reference: curves[reference][-1], other: chosen}


def run_viewpoints(
    runs: list[tuple[Path, str]], out: str | Path, *, split: str | None = None, overrides: list[str] = ()
) -> dict:
    """Evaluate every checkpoint of two (run dir, label) runs trained on one viewpoint split, match them, and write
    the table and plot. `overrides` ("a.b=c") apply to both runs' config.yaml. Returns the result written to JSON."""
    if len(runs) != 2:
        raise ConfigError(f"the viewpoint comparison takes two runs (capsules and a CNN), got {len(runs)}")
    opened = open_runs(runs, overrides)
    for run, _ in opened:
        viewpoint = run.cfg.data.viewpoint
        if viewpoint == "none" or (split is not None and viewpoint != split):
            raise ConfigError(
                f"{run.run_dir}: trained with data.viewpoint: {viewpoint}, expected "
                f"{split or 'azimuth or elevation'}; train it with --set data.viewpoint="
                f"{split or 'azimuth'}"
            )
    if opened[0][0].cfg.data.viewpoint != opened[1][0].cfg.data.viewpoint:
        raise ConfigError(
            f"{runs[0][0]} and {runs[1][0]} were trained on different viewpoint splits "
            f"({opened[0][0].cfg.data.viewpoint}, {opened[1][0].cfg.data.viewpoint})"
        )
    split = opened[0][0].cfg.data.viewpoint
    curves, counts = {}, {}
    for run, label in opened:
        curves[label], counts = evaluate_checkpoints(run, label)
    reference, matched = match(curves)
    result = {
        "experiment": "viewpoints",
        "split": split,
        "images": counts,
        "reference": reference,
        "models": [
            {
                "label": label,
                "run_dir": str(run.run_dir),
                "model": run.cfg.model.size,
                "matched": asdict(matched[label]),
                "last": asdict(curves[label][-1]),
                "checkpoints": [asdict(p) for p in curves[label]],
            }
            for run, label in opened
        ],
    }
    for path in write_outputs(out, f"viewpoints-{split}", result, _table(result), _plot(result)):
        print(f"written: {path}")
    opened[0][0].accelerator.end_training()
    return result


def _table(result: dict) -> str:
    """Markdown: each model at the matched checkpoint, and the non-reference model at its last one."""
    rows = []
    for m in result["models"]:
        rows.append(
            [
                f"{m['label']} ({m['model']})",
                f"step {m['matched']['step']}, matched",
                percent(m["matched"]["familiar"]),
                percent(m["matched"]["novel"]),
            ]
        )
        if m["label"] != result["reference"]:
            rows.append(
                [
                    f"{m['label']} ({m['model']})",
                    f"step {m['last']['step']}, last",
                    percent(m["last"]["familiar"]),
                    percent(m["last"]["novel"]),
                ]
            )
    gap = abs(result["models"][0]["matched"]["familiar"] - result["models"][1]["matched"]["familiar"])
    return (
        f"smallNORB, {result['split']} split: {result['images']['familiar']} test images at the familiar "
        f"viewpoints, {result['images']['novel']} at the novel ones. Reference: {result['reference']} at its last "
        f"checkpoint; the other run at its checkpoint closest in familiar accuracy (gap "
        f"{100 * gap:.1f} points).\n\n"
        + markdown_table(["model", "checkpoint", "familiar accuracy", "novel accuracy"], rows)
    )


def _plot(result: dict):
    """Left: familiar and novel accuracy against step. Right: novel against familiar, the matched pair marked."""
    fig, (step_ax, match_ax) = figure(2)
    for i, m in enumerate(result["models"]):
        color, points = f"C{i}", m["checkpoints"]
        steps = [p["step"] for p in points]
        step_ax.plot(
            steps, [p["familiar"] for p in points], "-o", color=color, markersize=3, label=f"{m['label']} familiar"
        )
        step_ax.plot(steps, [p["novel"] for p in points], "--s", color=color, markersize=3, label=f"{m['label']} novel")
        match_ax.plot(
            [p["familiar"] for p in points],
            [p["novel"] for p in points],
            "-o",
            color=color,
            markersize=3,
            alpha=0.5,
            label=f"{m['label']} checkpoints",
        )
        match_ax.plot(
            m["matched"]["familiar"],
            m["matched"]["novel"],
            "*",
            color=color,
            markersize=14,
            label=f"{m['label']} matched (step {m['matched']['step']})",
        )
    reference = next(m for m in result["models"] if m["label"] == result["reference"])
    match_ax.axvline(reference["matched"]["familiar"], color="grey", linestyle=":", label="reference familiar accuracy")
    step_ax.set(xlabel="step", ylabel="test accuracy", title="familiar and novel viewpoints")
    match_ax.set(
        xlabel="familiar-viewpoint accuracy", ylabel="novel-viewpoint accuracy", title="at matched familiar accuracy"
    )
    for ax in (step_ax, match_ax):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(f"smallNORB novel viewpoints, {result['split']} split")
    return fig
