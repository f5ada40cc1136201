"""The optimizer update of a global step, skipped on the device when anything in it is not finite.

A step is skipped, on every rank alike and without a host synchronisation, when the loss of any rank or any
gradient is NaN or infinite: weights, moments and step counts stay as they were. The check and the skip are
torch's GradScaler's, the public way to skip a fused optimizer's update on the device (it hands what it found to
the optimizer's kernel): under fp16 Accelerate's scaler, with its dynamic loss scale (saved in checkpoints);
otherwise one held at scale 1, which scales nothing and only checks. A non-finite loss on any rank (the step's
all-reduced flag) multiplies the loss by NaN before backward, so the gradients are NaN on every rank and the same
check skips the step, also when that loss's own gradients were finite. Under DDP the gradients are averaged over
the ranks in backward, so every rank finds the same and skips the same steps.
"""

from __future__ import annotations

import math

import torch


class GuardedUpdate:
    """backward, then step: the update of one global step, skipped where anything is non-finite."""

    def __init__(self, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler | None, device_type: str):
        """optimizer: a fused one (build_optimizer), which takes the skip on the device; scaler: Accelerate's
        (fp16), or None for a scale-1 one."""
        self.optimizer = optimizer
        self.dynamic = scaler is not None
        self.scaler = scaler or torch.amp.GradScaler(device_type, init_scale=1.0)

    def backward(self, loss: torch.Tensor, poisoned: torch.Tensor) -> None:
        """Gradients of the scalar `loss` in the parameters' .grad, unscaled (ready to read and clip); NaN where
        the device bool `poisoned` (a non-finite loss on some rank) is set."""
        factor = torch.where(poisoned, math.nan, 1.0)  # a fill on the device: 1 leaves the loss bit for bit
        self.scaler.scale(loss * factor).backward()
        self.scaler.unscale_(self.optimizer)

    def step(self) -> torch.Tensor:
        """Apply the update, or skip it (on the device) where a gradient is non-finite. Returns that skip as a
        device bool."""
        grads = [p.grad for group in self.optimizer.param_groups for p in group["params"] if p.grad is not None]
        skipped = ~torch.stack([torch.isfinite(g).all() for g in grads]).all()  # what the scaler finds
        self.scaler.step(self.optimizer)
        self.scaler.update(None if self.dynamic else 1.0)
        return skipped
