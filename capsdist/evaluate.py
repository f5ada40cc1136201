"""Evaluate a run's checkpoint on a split (launch/evaluate.py): the distributed evaluation of
capsdist.train.evaluation, printed and written as JSON next to the run."""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from capsdist.config import config_from_dict
from capsdist.data import eval_loader
from capsdist.errors import CheckpointError
from capsdist.files import write_atomic
from capsdist.loss import make_loss
from capsdist.run import data_options, load_data, make_accelerator, model_for_data
from capsdist.train import checkpoint
from capsdist.train.evaluation import evaluate


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
    model = model_for_data(cfg, manifest, opts).to(accelerator.device)
    model.load_state_dict(checkpoint.read_weights(path))
    step = checkpoint.read_state(path).step
    loss_fn = make_loss(
        cfg.loss.name, margin_schedule=cfg.loss.margin_schedule, max_margin_steps=cfg.loss.max_margin_steps
    )
    batch = cfg.eval.batch_size or cfg.train.batch_size
    loader = eval_loader(
        manifest,
        opts,
        split,
        rank=accelerator.process_index,
        world_size=accelerator.num_processes,
        per_rank_batch=max(batch // accelerator.num_processes, 1),
    )
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
