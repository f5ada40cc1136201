"""Build what a run needs from its Config: data options and manifest, model, optimizer, LR schedule."""

from __future__ import annotations

import math
from datetime import timedelta
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import InitProcessGroupKwargs

from capsdist.config import Config
from capsdist.data.pipeline import DataOptions, input_shape, load_manifest
from capsdist.data.manifest import is_remote, prepare_command
from capsdist.data.shards import prepare
from capsdist.data.sources import DATASETS
from capsdist.errors import ConfigError, DataError
from capsdist.model import build_model as model_from_config


def make_accelerator(cfg: Config, log_with: str | None = None) -> Accelerator:
    """The run's Accelerator. Without CUDA it is created with cpu=True: a multi-process launch on CPU
    (accelerate launch --multi_gpu / use_cpu config, torchrun) otherwise gives N separate 1-process runs.
    Every collective (all-reduce, barrier, gather) gives up after train.collective_timeout_s."""
    timeout = InitProcessGroupKwargs(timeout=timedelta(seconds=cfg.train.collective_timeout_s))
    return Accelerator(cpu=not torch.cuda.is_available(), mixed_precision=cfg.train.mixed_precision,
                       log_with=log_with, dynamo_backend="inductor" if cfg.train.compile else "no",
                       kwargs_handlers=[timeout])


def data_options(cfg: Config) -> DataOptions:
    """The data pipeline's options from the `data` section (train.seed seeds the data order)."""
    d = cfg.data
    return DataOptions(shards=cfg.shards, val_strategy=d.val_strategy, val_fraction=d.val_fraction,
                       viewpoint=d.viewpoint, channels=d.channels, augment=d.augment, pad_crop=d.pad_crop,
                       num_workers=d.num_workers, shuffle_buffer=d.shuffle_buffer,
                       skip_corrupt=d.skip_corrupt, seed=cfg.train.seed)


def load_data(cfg: Config, accelerator: Accelerator, opts: DataOptions):
    """The shards' manifest; when missing and data.prepare is auto, rank 0 prepares them first.

    Preparation needs the raw files or the network (smallNORB and Fashion-MNIST download);
    when it fails (offline), the DataError gives the exact prepare command to run by hand.
    The other ranks wait at a barrier and then read the same manifest.
    """
    if is_remote(cfg.shards) or (Path(cfg.shards) / "manifest.json").is_file():  # a URL or pipe: is never prepared
        return load_manifest(opts.shards)
    if cfg.data.dataset not in DATASETS:
        raise ConfigError(f"data.dataset: unknown dataset {cfg.data.dataset!r}; known: {', '.join(DATASETS)} "
                          f"(or point data.shards at prepared shards; {cfg.shards} holds no manifest.json)")
    command = prepare_command(cfg.data.dataset, cfg.shards)
    if cfg.data.prepare == "never":
        raise DataError(f"{cfg.shards}: no prepared {cfg.data.dataset} shards (no manifest.json); run `{command}` "
                        "(or set data.prepare: auto to prepare them at the start of the run)")
    error = None
    if accelerator.is_main_process:
        print(f"capsdist: no shards at {cfg.shards}: preparing {cfg.data.dataset} there (rank 0)")
        try:
            prepare(cfg.data.dataset, Path(cfg.shards))
        except DataError as err:
            error = DataError(f"{err}\ncould not prepare {cfg.data.dataset} automatically; run `{command}` "
                              "(add --source DIR with the raw files when offline), then start the run again")
    accelerator.wait_for_everyone()
    if error is not None:
        raise error
    if not (Path(cfg.shards) / "manifest.json").is_file():
        raise DataError(f"{cfg.shards}: rank 0 could not prepare {cfg.data.dataset}; see its error")
    return load_manifest(opts.shards)


def build_model(cfg: Config, manifest, opts: DataOptions) -> torch.nn.Module:
    """The configured model (a CapsNet or a CNN baseline) for the manifest's input shape and classes."""
    channels, height, width = input_shape(manifest, opts)
    if height != width:
        raise DataError(f"{opts.shards}: the models need square inputs, the data gives {height}x{width}")
    return model_from_config(cfg.model, in_channels=channels, input_size=height, num_classes=len(manifest.classes))


def lr_factor(step: int, optim_cfg, total_steps: int) -> float:
    """The learning-rate multiplier at a global step: a pure function of the step, so it needs no saved state.

    exponential: lr_decay_rate ** (step / lr_decay_steps) (the paper's; 1 when lr_decay_rate <= 0).
    cosine: from 1 down to final_lr_ratio at total_steps along half a cosine, then final_lr_ratio.
    """
    o = optim_cfg
    if o.schedule == "cosine":
        progress = min(max(step, 0) / max(total_steps, 1), 1.0)
        return o.final_lr_ratio + (1.0 - o.final_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))
    return math.pow(o.lr_decay_rate, step / o.lr_decay_steps) if o.lr_decay_rate > 0 else 1.0


def build_optimizer(cfg: Config, model: torch.nn.Module, total_steps: int):
    """Adam or AdamW at optim.lr, and a LambdaLR whose step count is the global step (`lr_factor`);
    total_steps is the last global step of train.epochs (the cosine schedule ends there)."""
    o = cfg.optim
    kind = torch.optim.AdamW if o.name == "adamw" else torch.optim.Adam
    optimizer = kind(model.parameters(), lr=o.lr, weight_decay=o.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, o, total_steps))
    return optimizer, scheduler
