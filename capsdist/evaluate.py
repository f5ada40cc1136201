"""Distributed evaluation: accuracy, loss, per-class accuracy and confusion matrix, each sample once.

Every rank evaluates its share of the split; the rows (sample index, label, prediction) are
gathered on all ranks, padding rows (index -1) are dropped and each index is counted once, so
1 or N processes give exactly the same numbers. `evaluate_run` backs launch/evaluate.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
import yaml
from accelerate import Accelerator
from accelerate.utils import gather_object

from safetensors.torch import load_file

from capsdist.config import config_from_dict
from capsdist.data.pipeline import eval_loader
from capsdist.errors import CheckpointError
from capsdist.files import write_atomic
from capsdist.loss import make_loss
from capsdist.train import checkpoint
from capsdist.train.setup import build_model, data_options, load_data, make_accelerator


@torch.no_grad()
def evaluate(accelerator: Accelerator, model: torch.nn.Module, loader, loss_fn, step: int,
             num_classes: int, keep_misclassified: int = 0) -> dict:
    """Evaluate `model` on the batches of `loader` (this rank's share) and combine across ranks.

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
            loss, _ = loss_fn(acts[valid], labels[valid], step)
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


def evaluate_run(run_dir: str | Path, which: str = "best", split: str = "test", overrides: list[str] = ()) -> dict:
    """Evaluate a run's checkpoint (`best`, `latest` or a path) on `split`; print and write JSON.

    The model and data settings come from run_dir/config.yaml, with `overrides` ("a.b=c") applied.
    Returns the result dict (without images) on every rank; rank 0 prints it and writes
    run_dir/eval-<checkpoint>-<split>.json.
    """
    run_dir = Path(run_dir)
    config_file = run_dir / "config.yaml"
    if not config_file.is_file():
        raise CheckpointError(f"{config_file}: missing; is {run_dir} a capsdist run directory?")
    cfg = config_from_dict(yaml.safe_load(config_file.read_text()), str(config_file), overrides)
    path = checkpoint.resolve(run_dir, which)
    accelerator = make_accelerator(cfg)
    opts = data_options(cfg)
    manifest = load_data(cfg, accelerator, opts)
    model = build_model(cfg, manifest, opts).to(accelerator.device)
    model.load_state_dict(load_file(path / "model.safetensors"))
    step = checkpoint.read_state(path)["train"]["step"]
    loss_fn = make_loss(cfg.loss.name, margin_schedule=cfg.loss.margin_schedule,
                        max_margin_steps=cfg.loss.max_margin_steps)
    batch = cfg.eval.batch_size or cfg.train.batch_size
    loader = eval_loader(manifest, opts, split, rank=accelerator.process_index,
                         world_size=accelerator.num_processes,
                         per_rank_batch=max(batch // accelerator.num_processes, 1))
    result = evaluate(accelerator, model, loader, loss_fn, step, len(manifest.classes))
    result.pop("misclassified")
    result.update(split=split, checkpoint=str(path), step=step, classes=list(manifest.classes))
    if accelerator.is_main_process:
        out = run_dir / f"eval-{path.name}-{split}.json"
        write_atomic(out, json.dumps(result, indent=1).encode())
        print(format_result(result))
        print(f"written: {out}")
    accelerator.end_training()  # tear down the process group before exit (gloo/NCCL threads can abort it)
    return result


def format_result(result: dict) -> str:
    """Human-readable accuracy, per-class accuracy and confusion matrix."""
    classes = result["classes"]
    width = max(6, *(len(c) for c in classes))
    lines = [f"{result['split']} accuracy {result['accuracy']:.4f} ({result['count']} samples, "
             f"loss {result['loss']:.4f}) at step {result['step']} from {result['checkpoint']}",
             "per-class accuracy:"]
    lines += [f"  {c:<{width}} {a:.4f}" for c, a in zip(classes, result["per_class_accuracy"])]
    lines.append("confusion matrix (rows: true class, columns: predicted):")
    lines.append(" " * (width + 2) + " ".join(f"{i:>6}" for i in range(len(classes))))
    lines += [f"  {c:<{width}}" + " ".join(f"{n:>6}" for n in row) for c, row in zip(classes, result["confusion"])]
    return "\n".join(lines)
