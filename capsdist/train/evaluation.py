"""Distributed evaluation: accuracy, loss, per-class accuracy and confusion matrix, each sample once.

Every rank evaluates its share of the split; the rows (sample index, label, prediction) are
gathered on all ranks, padding rows (index -1) are dropped and each index is counted once, so
1 or N processes give exactly the same numbers. The trainer runs it at epoch ends and every
eval.every_steps; capsdist.experiments.evaluate runs it on a saved checkpoint.
"""

from __future__ import annotations

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import gather_object


@torch.no_grad()
def evaluate(
    accelerator: Accelerator,
    model: torch.nn.Module,
    loader,
    loss_fn,
    images_seen: int,
    num_classes: int,
    keep_misclassified: int = 0,
) -> dict:
    """Evaluate `model` on the batches of `loader` (this rank's share) and combine across ranks.

    The loss uses the spread-loss margin after `images_seen` training images.
    Returns {"accuracy", "loss", "count", "per_class_accuracy" (K,), "confusion" (K x K, rows = true
    class)} on every rank, plus "misclassified": up to `keep_misclassified` (image (C, H, W) numpy,
    true, predicted) tuples, on every rank.
    """
    was_training = model.training
    model.eval()
    rows, misclassified = [], []
    loss_sum = torch.zeros((), dtype=torch.float64, device=accelerator.device)
    for batch in loader:
        images = batch.images.to(accelerator.device, non_blocking=True)
        labels = batch.labels.to(accelerator.device)
        index = batch.index.to(accelerator.device)
        with accelerator.autocast():
            acts = model(images)  # (B, K)
        pred = acts.argmax(dim=1)  # (B,)
        valid = index >= 0
        if valid.any():
            loss, _ = loss_fn(acts[valid], labels[valid], images_seen)
            loss_sum += loss.double() * valid.sum()
        rows.append(torch.stack([index, labels, pred], dim=1))  # (B, 3)
        wrong = (valid & (pred != labels)).nonzero().flatten().tolist()
        for i in wrong[: max(keep_misclassified - len(misclassified), 0)]:
            misclassified.append((batch.images[i].float().numpy(), int(labels[i]), int(pred[i])))
    model.train(was_training)
    local = torch.cat(rows) if rows else torch.empty((0, 3), dtype=torch.long, device=accelerator.device)
    local = accelerator.pad_across_processes(local, dim=0, pad_index=-1)
    table = accelerator.gather(local).cpu().numpy()  # (world * rows, 3)
    table = table[table[:, 0] >= 0]
    _, first = np.unique(table[:, 0], return_index=True)
    table = table[first]  # each sample index once
    confusion = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(confusion, (table[:, 1], table[:, 2]), 1)
    count = int(confusion.sum())
    totals = confusion.sum(axis=1)
    per_class = np.divide(np.diag(confusion), totals, out=np.zeros(num_classes), where=totals > 0)
    return {
        "accuracy": float(np.trace(confusion) / max(count, 1)),
        "loss": float(accelerator.reduce(loss_sum, "sum").item() / max(count, 1)),
        "count": count,
        "per_class_accuracy": per_class.tolist(),
        "confusion": confusion.tolist(),
        "misclassified": gather_object(misclassified)[:keep_misclassified] if keep_misclassified else [],
    }
