"""The checkpointer: when the trainer checkpoints, what it writes again and what it keeps as `best`.

Its steps (`should_save`): every checkpoint.every_steps, each epoch end and the last step; the trainer also saves
after every evaluation (so `best` is a copy of that step's checkpoint) and on a stop. A state is written once: at a
step already saved only when the state changed since (an evaluation after a periodic checkpoint found a new best).
While the last steps were skipped as non-finite nothing is written: the weights that made them so may be poisoned
though finite, and retention would prune the healthy checkpoints for them. The layout, the atomic writes and the
retention (checkpoint.keep_last) are capsdist/train/checkpoint.py's.
"""

from __future__ import annotations

import logging
import shlex
from pathlib import Path

import torch
from accelerate import Accelerator

from capsdist.config import CheckpointConfig
from capsdist.train import checkpoint
from capsdist.train.checkpoint import TrainState

log = logging.getLogger("capsdist")


class Checkpointer:
    """Owns the last checkpoint written (or resumed from) and its state, the cadence and the choice of `best`."""

    def __init__(
        self,
        accelerator: Accelerator,
        model: torch.nn.Module,
        run_dir: Path,
        cfg: CheckpointConfig,
        data: dict,
        state: TrainState,
        resumed: Path | None,
    ):
        """model: the unwrapped model (checked finite before a save); data: what the run trains on
        (capsdist.data.data_identity), recorded in every checkpoint; state and resumed: the run's start."""
        self.accelerator, self.model, self.run_dir, self.data = accelerator, model, run_dir, data
        self.every, self.keep_last, self.best_metric = cfg.every_steps, cfg.keep_last, cfg.best_metric
        self.last = resumed  # the last checkpoint written or resumed from ...
        self._last_state = state.state_dict() if resumed is not None else None  # ... and its state

    def should_save(self, step: int, epoch_end: bool, last_step: bool) -> bool:
        """Whether global `step` is a checkpoint step: its cadence, an epoch's end, the run's last step."""
        return epoch_end or last_step or bool(self.every and step % self.every == 0)

    def save(self, state: TrainState, nonfinite_run: int, metrics: dict | None = None) -> None:
        """Checkpoint `state` (nothing while `nonfinite_run` steps in a row were skipped); with the `metrics` of an
        evaluation at this step, copy the checkpoint to `best` when checkpoint.best_metric improved (the state
        saved records it). NaN weights are refused (TrainingError)."""
        score = None if metrics is None else metrics[self.best_metric]
        improved = score is not None and score > state.best_metric and not nonfinite_run  # no copy in a streak
        if improved:
            state.best_metric, state.best_step = score, state.step
        path = self._write(state, nonfinite_run)
        if improved:
            checkpoint.copy_to_best(self.accelerator, path)

    def _write(self, state: TrainState, nonfinite_run: int) -> Path | None:
        """The step checkpoint of `state`, written unless it is the last one's state; None in a non-finite streak."""
        if nonfinite_run:
            log.warning(
                "step %d: not checkpointing after %d non-finite steps in a row; %s",
                state.step,
                nonfinite_run,
                self.last_healthy(),
            )
            return None
        if self._last_state == state.state_dict():
            return self.last
        checkpoint.assert_finite(self.model)
        path = checkpoint.save(self.accelerator, self.run_dir, state, self.keep_last, self.data)
        self.last, self._last_state = path, state.state_dict()
        return path

    def last_healthy(self) -> str:
        """Names the checkpoint a run stopped by non-finite steps continues from: the last one written or resumed."""
        if self.last is None:
            return "no checkpoint was written before them"
        return f"the last healthy checkpoint is {self.last} (step {self._last_state['step']})"


def resume_hint(run_dir: Path) -> str:
    """The launch/train.py arguments that continue the run in `run_dir`, shell-quoted."""
    return shlex.join(["--resume", "auto", "--run-dir", str(run_dir)])
