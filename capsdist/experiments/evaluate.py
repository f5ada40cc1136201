"""Evaluate a run's checkpoint on a split (launch/evaluate.py): the distributed evaluation of
capsdist.train.evaluation, printed and written as JSON next to the run. `open_run` rebuilds a trained run's
model and data, for the experiments to load each checkpoint of a run into."""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml
from accelerate import Accelerator

from capsdist.config import Config, config_from_dict
from capsdist.data import DataOptions, Manifest, eval_loader
from capsdist.core.errors import CheckpointError, StorageError
from capsdist.core.files import write_atomic
from capsdist.model.loss import LossFn, make_loss
from capsdist.train.build import data_options, load_data, make_accelerator, model_for_data
from capsdist.train import checkpoint
from capsdist.train.evaluation import evaluate


@dataclass
class OpenRun:
    """A trained run's model and data, rebuilt from run_dir/config.yaml: load checkpoints into it and evaluate."""

    run_dir: Path
    cfg: Config
    accelerator: Accelerator
    opts: DataOptions
    manifest: Manifest
    model: torch.nn.Module  # on accelerator.device; maps images (N, C, S, S) to class scores (N, K)
    loss_fn: LossFn

    @property
    def classes(self) -> list[str]:
        return list(self.manifest.classes)

    def load(self, which: str) -> tuple[Path, int]:
        """Load checkpoint `which` (best, latest or a path) into the model: (its verified path, its global step).
        Weights come from safetensors, which hold tensors only and never run code; what is loaded is what was
        verified, even with a training run pruning checkpoints beside it."""
        path = checkpoint.resolve(self.run_dir, which)
        weights, state = checkpoint.read_checkpoint(path)
        try:
            self.model.load_state_dict(weights)
        except RuntimeError as err:
            raise CheckpointError(
                f"{path}: its weights do not fit the model of {self.run_dir / 'config.yaml'} "
                f"({str(err).splitlines()[0]}); was the config changed with --set?"
            ) from None
        return path, state.step

    def loader(self, split: str, *, limit: int | None = None, pixels_only: bool = False):
        """This process's share of `split` in batches of eval.batch_size (or train.batch_size) over all processes;
        `limit` and `pixels_only` as for capsdist.data.eval_loader."""
        acc = self.accelerator
        batch = self.cfg.eval.batch_size or self.cfg.train.batch_size
        return eval_loader(
            self.manifest,
            self.opts,
            split,
            rank=acc.process_index,
            world_size=acc.num_processes,
            per_rank_batch=max(batch // acc.num_processes, 1),
            limit=limit,
            pixels_only=pixels_only,
        )

    def evaluate(self, split: str, step: int) -> dict:
        """`evaluate` of the loaded weights on `split` (the loss at global `step`, for the spread-loss margin)."""
        seen = step * self.cfg.train.batch_size
        result = evaluate(self.accelerator, self.model, self.loader(split), self.loss_fn, seen, len(self.classes))
        result.pop("misclassified")
        return result


def open_run(run_dir: str | Path, overrides: list[str] = (), accelerator: Accelerator | None = None) -> OpenRun:
    """Rebuild a run's model (untrained: `OpenRun.load` a checkpoint into it) and data from run_dir/config.yaml with
    `overrides` ("a.b=c") applied. Several runs opened in one process share the `accelerator` of the first."""
    run_dir = Path(run_dir)
    config_file = run_dir / "config.yaml"
    if not config_file.is_file():
        raise CheckpointError(f"{config_file}: missing; is {run_dir} a capsdist run directory?")
    cfg = config_from_dict(yaml.safe_load(config_file.read_text()), str(config_file), overrides)
    accelerator = accelerator or make_accelerator(cfg)
    opts = data_options(cfg)
    manifest = load_data(cfg, accelerator, opts)
    model = model_for_data(cfg, manifest, opts).to(accelerator.device)
    loss_fn = make_loss(
        cfg.loss.name, margin_schedule=cfg.loss.margin_schedule, max_margin_images=cfg.loss.max_margin_images
    )
    return OpenRun(run_dir, cfg, accelerator, opts, manifest, model, loss_fn)


def open_runs(runs: list[tuple[Path, str]], overrides: list[str] = ()) -> list[tuple[OpenRun, str]]:
    """`open_run` for every (run dir, label), in order, sharing one accelerator: [(OpenRun, label)]."""
    opened, accelerator = [], None
    for run_dir, label in runs:
        run = open_run(run_dir, overrides, accelerator)
        accelerator = run.accelerator
        opened.append((run, label))
    return opened


def evaluate_run(run_dir: str | Path, which: str = "best", split: str = "test", overrides: list[str] = ()) -> dict:
    """Evaluate a run's checkpoint (`best`, `latest` or a path) on `split`; print and write JSON.

    The model and data settings come from run_dir/config.yaml, with `overrides` ("a.b=c") applied.
    Returns the result dict (without images) on every rank; rank 0 prints it and writes
    run_dir/eval-<checkpoint>-<split>.json (when that cannot be written, a read-only run, it says so on stderr).
    """
    run = open_run(run_dir, overrides)
    path, step = run.load(which)
    result = run.evaluate(split, step)
    result.update(split=split, checkpoint=str(path), step=step, classes=run.classes)
    if run.accelerator.is_main_process:
        print(format_result(result))
        out = run.run_dir / f"eval-{path.name}-{split}.json"
        try:
            write_atomic(out, json.dumps(result, indent=1).encode())
            print(f"written: {out}")
        except StorageError as err:
            print(f"capsdist: warning: the result above is not saved: {err}", file=sys.stderr)
    run.accelerator.end_training()  # tear down the process group before exit (gloo/NCCL threads can abort it)
    return result


def format_result(result: dict) -> str:
    """Human-readable accuracy, per-class accuracy and confusion matrix."""
    classes = result["classes"]
    width = max(6, *(len(c) for c in classes))
    lines = [
        f"{result['split']} accuracy {result['accuracy']:.4f} ({result['count']} samples, "
        f"loss {result['loss']:.4f}) at step {result['step']} from {result['checkpoint']}",
        "per-class accuracy:",
    ]
    lines += [f"  {c:<{width}} {a:.4f}" for c, a in zip(classes, result["per_class_accuracy"])]
    lines.append("confusion matrix (rows: true class, columns: predicted):")
    lines.append(" " * (width + 2) + " ".join(f"{i:>6}" for i in range(len(classes))))
    lines += [f"  {c:<{width}}" + " ".join(f"{n:>6}" for n in row) for c, row in zip(classes, result["confusion"])]
    return "\n".join(lines)
