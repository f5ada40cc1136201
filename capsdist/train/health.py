"""Training health, logged on log steps: per-layer capsule statistics, gradient norms, and a warning when the
class capsules are all dead or all saturated for a while (the two usual ways an EM capsule network stops
learning: every class activation near 0, or every one near 1 where the logistic is flat).
"""

from __future__ import annotations

import logging

import torch
import torch.nn as nn

log = logging.getLogger("capsdist")


def grad_norm_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """L2 norm of the gradients of each top-level submodule of `model` and of all of them ("total"), as scalar
    tensors on the gradients' device (no host synchronisation; the trainer reads them on log steps).

    Call after backward and before the gradients are cleared. Under DDP the gradients are already averaged over
    the ranks, so every rank gets the same values.
    """
    norms: dict[str, torch.Tensor] = {}
    for name, child in model.named_children():
        grads = [p.grad.detach().float().norm() for p in child.parameters() if p.grad is not None]
        if grads:
            norms[name] = torch.stack(grads).norm()
    if not norms:
        return {}
    total = torch.stack(list(norms.values())).norm()
    return {f"grad_norm/{name}": value for name, value in {**norms, "total": total}.items()}


def grad_norms(model: nn.Module) -> dict[str, float]:
    """`grad_norm_tensors`, read on the host."""
    return {key: float(value) for key, value in grad_norm_tensors(model).items()}


class ClassHealthMonitor:
    """Warns once when the class capsules have been all dead or all saturated at every log step for at least
    `patience` steps, and once more when they recover."""

    def __init__(self, patience: int):
        self.patience = patience
        self._since: dict[str, int | None] = {"dead": None, "saturated": None}
        self._warned: dict[str, bool] = {"dead": False, "saturated": False}

    def update(self, class_stats: dict[str, float], step: int) -> None:
        """class_stats: the class layer's health statistics at global `step` (dead_fraction, saturated_fraction)."""
        state = {
            "dead": class_stats.get("dead_fraction", 0.0) >= 1.0,
            "saturated": class_stats.get("saturated_fraction", 0.0) >= 1.0,
        }
        for kind, bad in state.items():
            if not bad:
                if self._warned[kind]:
                    log.warning("step %d: the class capsules are no longer all %s", step, kind)
                self._since[kind], self._warned[kind] = None, False
                continue
            if self._since[kind] is None:
                self._since[kind] = step
            if not self._warned[kind] and step - self._since[kind] >= self.patience:
                self._warned[kind] = True
                hint = (
                    "activations below 0.01 on every image: lower optim.lr or model.final_lambda"
                    if kind == "dead"
                    else "activations above 0.99 on every image, where the logistic is flat: lower "
                    "model.final_lambda or optim.lr"
                )
                log.warning(
                    "step %d: the class capsules have been all %s for %d steps (%s)",
                    step,
                    kind,
                    step - self._since[kind],
                    hint,
                )
