"""Training health: per-layer capsule statistics and gradient norms (logged on log steps), a warning when the class
capsules are all dead or all saturated for a while (the two usual ways an EM capsule network stops learning: every
class activation near 0, or every one near 1 where the logistic is flat), and the count of the steps skipped as
non-finite and of the corrupt samples skipped, which stops a run past its limits.
"""

from __future__ import annotations

import logging
from typing import Callable

import torch
import torch.nn as nn

from capsdist.config import Config
from capsdist.core.errors import TrainingError
from capsdist.train.checkpoint import TrainState

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


class StepHealth:
    """The skipped steps and samples of the steps a host step reads: counted in the TrainState, warned about, and a
    TrainingError after train.max_nonfinite non-finite steps in a row or past data.max_skipped_fraction of an epoch's
    samples skipped as corrupt."""

    def __init__(
        self,
        state: TrainState,
        cfg: Config,
        epoch_samples: int,
        prepare_command: str,
        last_healthy: Callable[[], str],
        resume: str,
    ):
        """epoch_samples: global samples per epoch; prepare_command: the dataset's (manifest.prepare_command);
        last_healthy: names the checkpoint a stopped run continues from; resume: the arguments that continue it."""
        self.state, self.epoch_samples, self.prepare_command = state, epoch_samples, prepare_command
        self.max_nonfinite, self.max_skipped_fraction = cfg.train.max_nonfinite, cfg.data.max_skipped_fraction
        self.last_healthy, self.resume = last_healthy, resume
        self.nonfinite_run = 0  # consecutive skipped steps

    def count(self, step: int, nonfinite: int, skipped_step: bool, skipped: int) -> dict:
        """Count global `step`: `nonfinite` ranks' losses were not finite, the update was skipped (`skipped_step`),
        `skipped` corrupt samples (all ranks). Returns the counters to log; TrainingError when the epoch has
        skipped too many samples."""
        state = self.state
        if skipped_step:
            state.nonfinite_total += 1
            self.nonfinite_run += 1
            log.warning(
                "step %d: %s, step skipped (%d in a row)",
                step,
                f"non-finite loss on {nonfinite} rank(s)" if nonfinite else "non-finite gradients",
                self.nonfinite_run,
            )
        else:
            self.nonfinite_run = 0
        if skipped and not state.skipped_total:
            log.warning(
                "step %d: %d corrupt training samples skipped (data.skip_corrupt); their slots repeat good "
                "samples; prepare the dataset again: %s",
                step,
                skipped,
                self.prepare_command,
            )
        state.skipped_total += skipped
        state.epoch_skipped += skipped
        limit = self.max_skipped_fraction
        if state.epoch_skipped > limit * self.epoch_samples:
            raise TrainingError(
                f"epoch {state.epoch}: {state.epoch_skipped} corrupt training samples skipped, more "
                f"than data.max_skipped_fraction {limit} of its {self.epoch_samples}; prepare the dataset "
                f"again ({self.prepare_command}) or raise data.max_skipped_fraction"
            )
        return {
            "train/nonfinite_total": state.nonfinite_total,
            "train/skipped": skipped,
            "train/skipped_total": state.skipped_total,
        }

    def check_streak(self, step: int) -> None:
        """TrainingError once train.max_nonfinite steps in a row, up to global `step`, were skipped."""
        if self.nonfinite_run >= self.max_nonfinite:
            raise TrainingError(
                f"{self.nonfinite_run} non-finite steps in a row at step {step}, none of them "
                f"checkpointed; {self.last_healthy()}. Lower optim.lr or set optim.grad_clip, then continue "
                f"with {self.resume}"
            )
