"""The evaluator: when the trainer evaluates, and the last result.

Its steps (`should_evaluate`): each epoch end, every eval.every_steps, and the last step; never twice at one step. An
evaluation runs the validation split and, with eval.test, the test split (capsdist.train.evaluation.evaluate: each
sample once, whatever the number of processes) and logs accuracy, loss, count, the confusion matrix and misclassified
images at the global step.
"""

from __future__ import annotations

import torch
from accelerate import Accelerator

from capsdist.config import Config
from capsdist.data import DataOptions, eval_loader
from capsdist.model.loss import LossFn
from capsdist.train.evaluation import evaluate
from capsdist.train.tracking import Tracker


class Evaluator:
    """Owns the evaluation cadence and the last result ({"step", "val_accuracy"[, "test_accuracy"]})."""

    def __init__(
        self,
        accelerator: Accelerator,
        model: torch.nn.Module,
        manifest,
        opts: DataOptions,
        cfg: Config,
        loss_fn: LossFn,
        tracker: Tracker,
        per_rank_batch: int,
    ):
        """model: the unwrapped model; manifest and opts: the run's data; per_rank_batch: eval batch per process."""
        self.accelerator, self.model, self.manifest, self.opts = accelerator, model, manifest, opts
        self.loss_fn, self.tracker, self.per_rank_batch = loss_fn, tracker, per_rank_batch
        self.every, self.misclassified = cfg.eval.every_steps, cfg.eval.misclassified_images
        self.splits = ["val", "test"] if cfg.eval.test else ["val"]
        self.classes = list(manifest.classes)
        self.last: dict = {}  # the last evaluation's metrics

    def should_evaluate(self, step: int, epoch_end: bool, last_step: bool) -> bool:
        """Whether to evaluate at global `step`: an epoch's end, the last step, every eval.every_steps; not again
        at the step of the last evaluation."""
        if self.last.get("step") == step:
            return False
        return epoch_end or last_step or bool(self.every and step % self.every == 0)

    def evaluate(self, step: int, images_seen: int) -> dict:
        """Evaluate every split at global `step` (the loss's margin at `images_seen`), log, and return
        {"step", "<split>_accuracy", ...} (also kept as `last`)."""
        acc = self.accelerator
        metrics: dict = {"step": step}
        for split in self.splits:
            loader = eval_loader(
                self.manifest,
                self.opts,
                split,
                rank=acc.process_index,
                world_size=acc.num_processes,
                per_rank_batch=self.per_rank_batch,
            )
            result = evaluate(acc, self.model, loader, self.loss_fn, images_seen, len(self.classes), self.misclassified)
            metrics[f"{split}_accuracy"] = result["accuracy"]
            self.tracker.log(
                {
                    f"{split}/accuracy": result["accuracy"],
                    f"{split}/loss": result["loss"],
                    f"{split}/count": result["count"],
                },
                step,
            )
            self.tracker.log_eval_media(split, result, self.classes, step)
        self.last = metrics
        return metrics
