"""One global training step, shared by the trainer and the benchmark (capsdist/train/benchmark.py), so the bench
times the step that trains.

In order: forward through the model Accelerate prepared (its autocast under mixed precision), the loss at the images
seen, the step's one all-reduce (non-finite flag, stop request, correct count, loss sum, skipped samples), backward
through GuardedUpdate (scaled under fp16; NaN on every rank where any rank's loss was not finite), the gradient norms
when asked for (log steps), gradient clipping, the learning rate of the images seen, and the fused optimizer's
update, skipped on the device where anything was not finite. Nothing is read on the host: the reduced values and the
skip stay on the device until the metrics logger reads them (capsdist/train/metrics.py).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from accelerate import Accelerator

from capsdist.config import Config
from capsdist.model.loss import LossFn
from capsdist.train.health import grad_norm_tensors
from capsdist.train.optim import build_optimizer, learning_rate, set_learning_rate
from capsdist.train.update import GuardedUpdate


class StepOutput(NamedTuple):
    """What one step leaves for the host: its learning rate and margin, and its values still on the device."""

    lr: float
    margin: float  # the spread-loss margin; nan for another loss
    values: torch.Tensor  # (6,) float64: the reduced (non-finite ranks, stop requests, correct, loss sum, skipped
    # samples), then 1.0 where the update was skipped
    grad_norms: dict[str, torch.Tensor]  # before clipping, when asked for; else empty


class TrainStep:
    """forward, loss, all-reduce, guarded backward, clipping, learning rate, fused update: one global step."""

    def __init__(self, accelerator: Accelerator, model, optimizer, cfg: Config, loss_fn: LossFn, schedule_images: int):
        """model and optimizer: prepared by `accelerator` (`prepare`); loss_fn: cfg.loss's (make_loss);
        schedule_images: the images the learning-rate schedule spans (train.epochs of them)."""
        self.accelerator, self.model, self.optimizer = accelerator, model, optimizer
        self.optim_cfg, self.loss_name = cfg.optim, cfg.loss.name
        self.loss_fn, self.schedule_images = loss_fn, schedule_images
        self.update = GuardedUpdate(optimizer.optimizer, accelerator.scaler, accelerator.device.type)

    @classmethod
    def prepare(
        cls, accelerator: Accelerator, model: torch.nn.Module, cfg: Config, loss_fn: LossFn, schedule_images: int
    ) -> TrainStep:
        """The step of `model` and its fused optimizer (optim.*), both prepared by `accelerator`."""
        model, optimizer = accelerator.prepare(model, build_optimizer(cfg.optim, model))
        return cls(accelerator, model, optimizer, cfg, loss_fn, schedule_images)

    def parts(self) -> list[str]:
        """What a call does, in order, in words (the bench's output lists them)."""
        clip, precision = self.optim_cfg.grad_clip, self.accelerator.mixed_precision
        return [
            "forward" + (f" under Accelerate's {precision} autocast" if precision != "no" else ""),
            self.loss_name,
            "all-reduce of the step's values",
            "backward (GuardedUpdate: scaled under fp16)",
            *([f"gradient clipping at {clip}"] if clip > 0 else []),
            "learning rate from the images seen",
            f"fused {self.optim_cfg.name} update, skipped on the device where not finite",
        ]

    def __call__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        images_seen: int,
        *,
        skipped: int = 0,
        stop: bool = False,
        grad_norms: bool = False,
    ) -> StepOutput:
        """One global step on this rank's images (B, C, H, W) and labels (B,), after `images_seen` global images
        (the schedules' clock); `skipped`: this rank's corrupt samples in the batch, `stop`: a stop request on
        this rank, `grad_norms`: measure them (a log step). Queued without reading any device value on the host.

        A step whose loss is non-finite on any rank, or whose gradients are, is skipped by every rank: GuardedUpdate
        leaves weights, moments and step count alone (decided on the device)."""
        acc, model = self.accelerator, self.model
        images = images.to(acc.device, non_blocking=True)  # (B, C, H, W)
        labels = labels.to(acc.device, non_blocking=True)  # (B,)
        acts = model(images)  # (B, K)
        loss, margin = self.loss_fn(acts, labels, images_seen)
        finite = torch.isfinite(loss.detach())

        def fill(value: float) -> torch.Tensor:  # a host number as a fill kernel: a copy from host memory would wait
            return torch.full((), value, dtype=torch.float64, device=acc.device)

        local = torch.stack(
            [
                (~finite).double(),
                fill(1.0 if stop else 0.0),
                (acts.detach().argmax(1) == labels).sum().double(),
                torch.where(finite, loss.detach().double() * len(labels), 0.0),
                fill(float(skipped)),
            ]
        )
        reduced = acc.reduce(local, "sum")  # the step's one collective: nonfinite, stop, correct, loss sum, skipped
        lr = learning_rate(images_seen, self.optim_cfg, self.schedule_images)
        self.update.backward(loss, poisoned=reduced[0] > 0)  # the gradients, unscaled under fp16
        norms = grad_norm_tensors(acc.unwrap_model(model)) if grad_norms else {}  # before clipping
        if self.optim_cfg.grad_clip > 0:  # torch's: Accelerate's would unscale the gradients a second time
            torch.nn.utils.clip_grad_norm_(model.parameters(), self.optim_cfg.grad_clip)
        set_learning_rate(self.optimizer, lr)
        skipped_step = self.update.step()
        self.optimizer.zero_grad(set_to_none=True)
        values = torch.cat([reduced, skipped_step.double()[None]])  # (6,): the reduced five, then the skip
        return StepOutput(lr, margin, values, norms)
