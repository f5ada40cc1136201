"""The metrics logger: the steps' values, kept on the device until a host step reads them all at once (one device
read) and logs one metrics line per step; on log steps (logging.every_steps) the throughput of the steps since the
last one, the model's health statistics and the gradient norms; the progress bar. Sinks: capsdist.train.tracking.
"""

from __future__ import annotations

import math
import resource
import sys
import time
from typing import NamedTuple

import torch
from accelerate import Accelerator
from tqdm.auto import tqdm

from capsdist.config import Config
from capsdist.train.health import ClassHealthMonitor, StepHealth
from capsdist.train.tracking import Tracker


class StepRecord(NamedTuple):
    """A step's host values and, still on the device, its values (capsdist.train.step.StepOutput.values)."""

    step: int  # the global step it completed
    epoch: int
    lr: float
    margin: float
    values: torch.Tensor  # (6,) float64


class MetricsLogger:
    """Owns the records not yet read, the logging cadence, the throughput window and the last gradient norms."""

    def __init__(
        self, accelerator: Accelerator, model: torch.nn.Module, tracker: Tracker, health: StepHealth, cfg: Config
    ):
        """model: the unwrapped model (its health_stats are logged)."""
        self.accelerator, self.model, self.tracker, self.health = accelerator, model, tracker, health
        self.every, self.batch_size = cfg.logging.every_steps, cfg.train.batch_size
        self.class_health = ClassHealthMonitor(cfg.logging.health_warn_steps)
        self.stop_requested = False  # some rank's step asked to stop (read by `flush`)
        self.last_loss: float | None = None  # the last step read: its mean loss (None: skipped)
        self._pending: list[StepRecord] = []  # steps whose values are still on the device
        self._grad_norms: dict[str, torch.Tensor] = {}  # of the last log step's backward, on the device
        self._window = _Window()
        self._tick = time.perf_counter()
        self._bar: tqdm | None = None

    def start(self, step: int, total_steps: int, values: dict) -> None:
        """Log the run's start (`values` at `step`) and show progress towards `total_steps` (rank 0)."""
        self.tracker.log({"event/start": 1, **values}, step)
        self._bar = tqdm(
            total=total_steps,
            initial=step,
            disable=not self.accelerator.is_main_process,
            unit="step",
            dynamic_ncols=True,
        )
        self.resume_clock()

    def should_log(self, step: int) -> bool:
        """Whether global `step` is a log step (throughput, health, gradient norms)."""
        return step % self.every == 0

    def add(self, record: StepRecord, grad_norms: dict[str, torch.Tensor]) -> None:
        """A step done (its time since `resume_clock` counts in the window); grad_norms: those of a log step."""
        self._pending.append(record)
        if grad_norms:
            self._grad_norms = grad_norms
        self._window.add(time.perf_counter() - self._tick, self.batch_size)
        self._bar.update(1)

    def resume_clock(self) -> None:
        """The next step's time starts now: a host step's evaluation or checkpoint is not step time."""
        self._tick = time.perf_counter()

    def flush(self) -> None:
        """Read the steps since the last host step (one device read) and log each; StepHealth counts their
        non-finite steps and skipped samples (a TrainingError past its limits)."""
        if not self._pending:
            return
        records, self._pending = self._pending, []
        values_per_step = torch.stack([r.values for r in records]).tolist()
        for record, (nonfinite, stop, correct, loss_sum, skipped, skipped_step) in zip(records, values_per_step):
            counts = self.health.count(record.step, int(nonfinite), bool(skipped_step), int(skipped))
            self.stop_requested = self.stop_requested or bool(stop)
            self.last_loss = None if skipped_step else loss_sum / self.batch_size
            values = {
                "train/loss": None if nonfinite else loss_sum / self.batch_size,
                "train/accuracy": correct / self.batch_size,
                "lr": record.lr,
                "epoch": record.epoch,
                **counts,
            }
            if not math.isnan(record.margin):
                values["margin"] = record.margin
            self.tracker.log(values, record.step)
            self.health.check_streak(record.step)

    def log_progress(self, step: int) -> None:
        """At log step `step`, after `flush`: throughput since the last log step, health statistics, the step's
        gradient norms (none when it was skipped: they are not finite), and the progress bar."""
        if self.last_loss is None:
            self._grad_norms = {}
        self.tracker.log(self._throughput(step), step)
        loss_text = "skipped" if self.last_loss is None else f"{self.last_loss:.4f}"
        self._bar.set_postfix(loss=loss_text, img_s=f"{self._window.images_per_s:.1f}")
        self._window = _Window()

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()

    def _throughput(self, step: int) -> dict:
        window, world = self._window, self.accelerator.num_processes
        values = {
            "perf/images_per_s": window.images_per_s,
            "perf/images_per_s_per_process": window.images_per_s / world,
            "perf/step_time_s": window.seconds / window.steps,
            "perf/peak_memory_mb": peak_memory_mb(self.accelerator.device),
        }
        stats = self.model.health_stats()
        for layer, layer_stats in stats.items():
            for key, value in layer_stats.items():
                values[f"health/{layer}/{key}"] = value
        if "classcaps" in stats:
            self.class_health.update(stats["classcaps"], step)
        values.update({key: float(value) for key, value in self._grad_norms.items()})
        self._grad_norms = {}
        return values


class _Window:
    """Step timings (data wait included) since the last throughput log."""

    def __init__(self):
        self.steps, self.seconds, self.images = 0, 0.0, 0

    def add(self, seconds: float, images: int) -> None:
        self.steps, self.seconds, self.images = self.steps + 1, self.seconds + seconds, self.images + images

    @property
    def images_per_s(self) -> float:
        return self.images / max(self.seconds, 1e-9)


def peak_memory_mb(device: torch.device) -> float:
    """The CUDA allocator's peak on `device`, or this process's peak resident set size, in MiB."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10  # bytes on macOS, KiB on Linux
