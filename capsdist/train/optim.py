"""The optimizer, and the learning rate as a pure function of the images seen (so it needs no saved state).

As in nanoGPT, the trainer writes `learning_rate(images_seen)` into the optimizer before every update: resuming
at a step gives the same learning rate whatever the run did before, on any number of processes, and the curve
against images seen is the same at any batch size.
"""

from __future__ import annotations

import math

import torch


def lr_factor(images_seen: int, optim_cfg, total_images: int) -> float:
    """The learning-rate multiplier after `images_seen` training images.

    exponential: lr_decay_rate ** (images_seen / lr_decay_images) (the paper's; 1 when lr_decay_rate <= 0).
    cosine: from 1 down to final_lr_ratio at total_images along half a cosine, then final_lr_ratio.
    """
    o = optim_cfg
    if o.schedule == "cosine":
        progress = min(max(images_seen, 0) / max(total_images, 1), 1.0)
        return o.final_lr_ratio + (1.0 - o.final_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))
    return math.pow(o.lr_decay_rate, images_seen / o.lr_decay_images) if o.lr_decay_rate > 0 else 1.0


def learning_rate(images_seen: int, optim_cfg, total_images: int) -> float:
    """optim.lr times `lr_factor`: the learning rate of the update made after `images_seen` images (global step
    x global batch); total_images is what train.epochs holds (the cosine schedule ends there)."""
    return optim_cfg.lr * lr_factor(images_seen, optim_cfg, total_images)


def set_learning_rate(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


def build_optimizer(optim_cfg, model: torch.nn.Module) -> torch.optim.Optimizer:
    """Adam or AdamW (optim.name) at optim.lr with optim.weight_decay.

    The fused implementation (one kernel for all parameters, CPU and CUDA): it takes the GradScaler's device-side
    skip (capsdist/train/update.py) and leaves a skipped step's weights, moments and step count untouched without
    a host synchronisation."""
    o = optim_cfg
    kind = torch.optim.AdamW if o.name == "adamw" else torch.optim.Adam
    return kind(model.parameters(), lr=o.lr, weight_decay=o.weight_decay, fused=True)
