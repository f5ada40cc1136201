"""Losses on class activations and the spread-loss margin schedules.

All losses take class activations a (N, K) in (0, 1) and integer targets t (N,), and return a scalar mean
over the batch. Margins are pure functions of the number of images seen (global step x global batch), so they
need no saved state and give the same curve on any number of processes and at any batch size.
"""

from __future__ import annotations

import math
from typing import Callable

import torch

LOSSES = ("spread_loss", "categorical_crossentropy", "squared_hinge")
MARGIN_SCHEDULES = ("linear", "sigmoid")
MARGIN_START, MARGIN_END_LINEAR = 0.2, 0.9


def margin_at(images_seen: int, schedule: str, max_margin_images: int) -> float:
    """Spread-loss margin after `images_seen` training images.

    linear:  0.2 -> 0.9 linearly over max_margin_images, then 0.9 (the paper).
    sigmoid: 0.2 + 0.79 * sigmoid(min(10, 14 * images_seen / max_margin_images - 4)), from about 0.21 to about
             0.99 (the authors' released code, whose step / 50000 - 4 reaches 10 at 700,000 steps; here that end
             point is max_margin_images).
    """
    progress = min(max(images_seen, 0) / max(max_margin_images, 1), 1.0)
    if schedule == "linear":
        return MARGIN_START + (MARGIN_END_LINEAR - MARGIN_START) * progress
    if schedule == "sigmoid":
        x = min(10.0, 14.0 * progress - 4.0)
        return MARGIN_START + 0.79 / (1.0 + math.exp(-x))
    raise ValueError(f"unknown margin schedule {schedule!r}: choose one of {MARGIN_SCHEDULES}")


def spread_loss(activations: torch.Tensor, targets: torch.Tensor, margin: float) -> torch.Tensor:
    """L = mean over the batch of sum_{i != t} max(0, m - (a_t - a_i))^2.  (N, K), (N,) -> scalar."""
    a = activations.float()
    a_t = a.gather(1, targets.unsqueeze(1))  # (N, 1)
    gaps = torch.clamp(margin - (a_t - a), min=0.0) ** 2  # (N, K); the target column is margin^2
    others = torch.ones_like(gaps).scatter_(1, targets.unsqueeze(1), 0.0)
    return (gaps * others).sum(dim=1).mean()


def categorical_crossentropy(activations: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of the activations normalised to sum 1 (Keras' CategoricalCrossentropy, as in the TensorFlow
    implementation)."""
    a = activations.float().clamp_min(1e-7)
    log_probs = torch.log(a) - torch.log(a.sum(dim=1, keepdim=True))  # (N, K)
    return -log_probs.gather(1, targets.unsqueeze(1)).mean()


def squared_hinge(activations: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """mean over classes and batch of max(0, 1 - y a)^2 with y = +1 for the target and -1 otherwise (Keras)."""
    a = activations.float()
    y = 2.0 * torch.zeros_like(a).scatter_(1, targets.unsqueeze(1), 1.0) - 1.0  # +1 target, -1 others
    return (torch.clamp(1.0 - y * a, min=0.0) ** 2).mean()


LossFn = Callable[[torch.Tensor, torch.Tensor, int], tuple[torch.Tensor, float]]


def make_loss(name: str, *, margin_schedule: str = "linear", max_margin_images: int = 1_280_000) -> LossFn:
    """loss_fn(activations (N, K), targets (N,), images_seen) -> (scalar loss, margin or nan if unused)."""
    if name == "spread_loss":
        margin_at(0, margin_schedule, max_margin_images)  # fail now on a bad schedule name

        def loss_fn(activations, targets, images_seen):
            margin = margin_at(images_seen, margin_schedule, max_margin_images)
            return spread_loss(activations, targets, margin), margin

        return loss_fn
    plain = {"categorical_crossentropy": categorical_crossentropy, "squared_hinge": squared_hinge}
    if name not in plain:
        raise ValueError(f"unknown loss {name!r}: choose one of {LOSSES}")
    return lambda activations, targets, images_seen: (plain[name](activations, targets), math.nan)
