"""The paper's adversarial experiment: accuracy and attack success rate against epsilon, for several trained runs.

The chosen checkpoint of each run (`best` by default) is attacked (capsdist.experiments.attacks: FGSM or BIM,
untargeted or targeted) on the same images: the first `limit` images of the test split in index order, which is the
shards' order, a fixed seeded shuffle made at preparation (all of the split without a limit). Epsilon is in pixel units of
[0, 1].

Success rate, untargeted: of the images the model classified correctly before the attack, the fraction it
misclassifies after. Targeted: the fraction of all images classified as their target class after the attack
(targets: `capsdist.experiments.attacks.target_classes`, the same for every model). Accuracy is over all images.

`run_adversarial` writes <out>/adversarial-<attack>-<targeted|untargeted>.json, .md and .png, and logs both curves
to W&B as line plots, plus a table, when the first run's config enables W&B (logging.wandb.mode; offline without
credentials, as in training).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from capsdist.experiments.attacks import BIM_STEP_RATIO, BIM_STEPS, bim, fgsm, target_classes
from capsdist.data.transforms import normalise
from capsdist.core.errors import ConfigError
from capsdist.experiments.evaluate import OpenRun, open_runs
from capsdist.experiments.output import figure, markdown_table, percent, write_outputs
from capsdist.train.tracking import start_wandb, sync_message, wandb_settings

ATTACKS = ("fgsm", "bim")


@dataclass(frozen=True)
class AttackSpec:
    """Which attack, towards which classes, at which epsilons (pixel units of [0, 1])."""

    name: str  # fgsm | bim
    targeted: bool
    eps: tuple[float, ...]
    steps: int = BIM_STEPS  # BIM iterations, each of BIM_STEP_RATIO * eps / steps
    seed: int = 0  # draws the targets

    def __post_init__(self):
        if self.name not in ATTACKS:
            raise ConfigError(f"attack {self.name!r}: expected one of {', '.join(ATTACKS)}")
        if not self.eps or any(not 0.0 <= e <= 1.0 for e in self.eps):
            raise ConfigError(f"eps {list(self.eps)}: give one or more epsilons in [0, 1] (pixel units)")
        if self.steps < 1:
            raise ConfigError(f"steps {self.steps}: BIM needs at least 1 step")

    @property
    def key(self) -> str:
        return f"{self.name}-{'targeted' if self.targeted else 'untargeted'}"

    def apply(
        self, forward, pixels: torch.Tensor, labels: torch.Tensor, eps: float, targets: torch.Tensor | None
    ) -> torch.Tensor:
        """Adversarial pixels (N, C, H, W) for pixels (N, C, H, W), labels (N,), targets (N,) or None."""
        if self.name == "fgsm":
            return fgsm(forward, pixels, labels, eps, targets=targets)
        return bim(forward, pixels, labels, eps, steps=self.steps, targets=targets)


def attack_run(run: OpenRun, spec: AttackSpec, limit: int | None, label: str) -> dict:
    """{"count", "clean_accuracy", "accuracy" [per eps], "success_rate" [per eps]} of the loaded model of `run`."""
    if run.accelerator.num_processes > 1:
        raise ConfigError("the adversarial experiment runs as one process: start it with python, not accelerate launch")
    model = run.model.eval().requires_grad_(False)
    dataset, device, num_classes = run.manifest.dataset, run.accelerator.device, len(run.classes)

    def forward(pixels: torch.Tensor) -> torch.Tensor:
        return model(normalise(dataset, pixels))  # (N, K)

    correct, success = np.zeros(len(spec.eps)), np.zeros(len(spec.eps))
    count = clean_correct = 0
    for batch in tqdm(run.loader("test", limit=limit, pixels_only=True), desc=label, unit="batch"):
        keep = batch.index >= 0  # padding rows have index -1
        pixels, labels = batch.images[keep].to(device), batch.labels[keep].to(device)  # (B, C, H, W), (B,)
        targets = target_classes(labels, batch.index[keep], num_classes, spec.seed) if spec.targeted else None
        with torch.no_grad():
            clean = forward(pixels).argmax(dim=1) == labels  # (B,)
        for k, eps in enumerate(spec.eps):
            adversarial = spec.apply(forward, pixels, labels, eps, targets)
            with torch.no_grad():
                predicted = forward(adversarial).argmax(dim=1)  # (B,)
            correct[k] += int((predicted == labels).sum())
            success[k] += int((predicted == targets).sum() if spec.targeted else (clean & (predicted != labels)).sum())
        count, clean_correct = count + len(labels), clean_correct + int(clean.sum())
    attacked = count if spec.targeted else max(clean_correct, 1)
    return {
        "count": count,
        "clean_accuracy": clean_correct / count,
        "accuracy": (correct / count).tolist(),
        "success_rate": (success / attacked).tolist(),
    }


def _test_images(run: OpenRun) -> tuple:
    """What decides the attacked images: dataset, test shards (by checksum) and viewpoint split."""
    shards = tuple(s.sha256 for s in run.manifest.splits["test"].shards)
    return run.manifest.dataset, shards, run.cfg.data.viewpoint


def run_adversarial(
    runs: list[tuple[Path, str]],
    out: str | Path,
    spec: AttackSpec,
    *,
    limit: int | None = None,
    checkpoints: list[str] = ("best",),
    overrides: list[str] = (),
) -> dict:
    """Attack every (run dir, label) in `runs` with `spec`; write and log the curves.

    `checkpoints`: the checkpoint of each run (best, latest or a path), or one for all. `overrides` ("a.b=c") apply
    to every run's config.yaml (for example data.shards when the shards moved). Returns the result written to JSON.
    """
    if not runs:
        raise ConfigError("name at least one run directory to attack")
    if len(checkpoints) not in (1, len(runs)):
        raise ConfigError(
            f"{len(checkpoints)} checkpoints for {len(runs)} runs: give one for all, or one per run "
            "in the order of the runs"
        )
    checkpoints = list(checkpoints) * len(runs) if len(checkpoints) == 1 else list(checkpoints)
    opened = open_runs(runs, overrides)
    first = _test_images(opened[0][0])
    for run, _ in opened[1:]:
        if _test_images(run) != first:
            raise ConfigError(
                f"{run.run_dir} and {opened[0][0].run_dir} test on different images (other dataset, "
                "shards or viewpoint split); point them at the same shards with --set data.shards=DIR"
            )
    models = []
    for (run, label), which in zip(opened, checkpoints):
        path, step = run.load(which)
        scores = attack_run(run, spec, limit, label)
        models.append(
            {
                "label": label,
                "run_dir": str(run.run_dir),
                "model": run.cfg.model.size,
                "checkpoint": str(path),
                "step": step,
                **scores,
            }
        )
        print(
            f"{label}: clean {percent(scores['clean_accuracy'])}, accuracy "
            + ", ".join(f"{percent(a)} at eps {e}" for e, a in zip(spec.eps, scores["accuracy"]))
        )
    result = {
        "experiment": "adversarial",
        "attack": spec.name,
        "targeted": spec.targeted,
        "eps": list(spec.eps),
        "bim_steps": spec.steps if spec.name == "bim" else None,
        "bim_step_size": f"{BIM_STEP_RATIO} * eps / steps" if spec.name == "bim" else None,
        "target_seed": spec.seed if spec.targeted else None,
        "images": {"split": "test", "first": limit, "count": models[0]["count"]},
        "loss": "cross-entropy of the class scores normalised to sum 1 (capsdist.experiments.attacks.attack_loss)",
        "models": models,
    }
    for path in write_outputs(out, f"adversarial-{spec.key}", result, _table(result), _plot(result)):
        print(f"written: {path}")
    _log_to_wandb(result, opened[0][0], Path(out), spec.key)
    opened[0][0].accelerator.end_training()
    return result


def _title(result: dict) -> str:
    kind = "targeted" if result["targeted"] else "untargeted"
    return f"{result['attack'].upper()}, {kind}, {result['images']['count']} test images"


def _table(result: dict) -> str:
    """Markdown: one row per epsilon; accuracy and success rate of every model."""
    header = ["epsilon"] + [f"{m['label']} {what}" for m in result["models"] for what in ("accuracy", "success")]
    rows = [
        [f"{eps:g}"] + [percent(m[key][k]) for m in result["models"] for key in ("accuracy", "success_rate")]
        for k, eps in enumerate(result["eps"])
    ]
    return f"{_title(result)}\n\n" + markdown_table(header, rows)


def _plot(result: dict):
    fig, (acc_ax, success_ax) = figure(2)
    for m in result["models"]:
        acc_ax.plot(result["eps"], m["accuracy"], "-o", markersize=4, label=m["label"])
        success_ax.plot(result["eps"], m["success_rate"], "-o", markersize=4, label=m["label"])
    for ax, name in ((acc_ax, "accuracy"), (success_ax, "attack success rate")):
        ax.set(xlabel="epsilon (pixel units of [0, 1])", ylabel=name, title=name, ylim=(-0.02, 1.02))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(_title(result))
    return fig


def _log_to_wandb(result: dict, run: OpenRun, out: Path, key: str) -> None:
    """Accuracy and success rate against epsilon as W&B line plots (one line per model) and a table, in a W&B run
    named after `out`, when `run`'s config enables W&B (project, entity and mode from logging.wandb)."""
    cfg = copy.deepcopy(run.cfg)
    cfg.logging.wandb.name = ""  # the experiment's run is named after its output folder, not after a training run
    settings = wandb_settings(cfg, out, is_main=True)
    if settings is None:
        return
    import wandb

    wb_run = start_wandb(
        lambda kwargs: wandb.init(project=cfg.logging.wandb.project, job_type="adversarial", **kwargs), settings
    )
    labels = [m["label"] for m in result["models"]]
    logged = {
        f"{key}/{metric}": wandb.plot.line_series(
            xs=result["eps"],
            ys=[m[metric] for m in result["models"]],
            keys=labels,
            title=f"{metric} ({_title(result)})",
            xname="epsilon",
        )
        for metric in ("accuracy", "success_rate")
    }
    rows = [
        [m["label"], eps, m["accuracy"][k], m["success_rate"][k]]
        for m in result["models"]
        for k, eps in enumerate(result["eps"])
    ]
    logged[f"{key}/table"] = wandb.Table(columns=["model", "epsilon", "accuracy", "success_rate"], data=rows)
    wb_run.log(logged)
    folder = Path(wb_run.dir).parent
    wb_run.finish()
    if settings["mode"] == "offline":
        print(sync_message(folder))
