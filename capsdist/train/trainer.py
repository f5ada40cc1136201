"""The training loop: Accelerate DDP, mixed precision, global-step schedules, exact resume.

One `Trainer(cfg).fit()` call runs on every process; rank 0 holds the run directory's lock from the start to the
end of it (capsdist/train/lock.py). Per global step each rank takes its per_rank_batch = batch_size / world_size
samples, and one all-reduce combines the ranks' loss, correct count, non-finite flag, skipped corrupt samples and
stop request (SIGTERM/SIGINT), so all ranks skip, stop and log the same way. The step never waits for the device:
the skip of a step whose loss (any rank) or gradients are non-finite is decided on the device
(capsdist/train/update.py), and the reduced values and the skip stay there until a host step (log, evaluation,
checkpoint, epoch end), which reads all the steps since the last one at once, logs each, counts non-finite steps
and skipped samples, and acts on stop requests (so in a multi-process run a stop request takes effect at the next
host step). The data position (epoch, batches consumed) lives in `TrainState`; a resumed run recreates that
epoch's loader and skips the consumed batches, which continues exactly on the same world size and at the same
global sample count on another.
"""

from __future__ import annotations

import logging
import math
import os
import resource
import shlex
import signal
import time
from pathlib import Path
from typing import NamedTuple

import torch
import yaml
from accelerate import Accelerator
from accelerate.utils import broadcast_object_list, set_seed
from tqdm.auto import tqdm

from capsdist import threads
from capsdist.config import Config, config_dict, save_config
from capsdist.data import check_same_data, data_identity, eval_loader, steps_per_epoch, train_loader
from capsdist.errors import CheckpointError, ConfigError, TrainingError
from capsdist.files import check_writable_dir
from capsdist.loss import make_loss
from capsdist.run import data_options, load_data, make_accelerator, model_for_data
from capsdist.train import checkpoint
from capsdist.train.checkpoint import TrainState
from capsdist.train.evaluation import evaluate
from capsdist.train.health import ClassHealthMonitor
from capsdist.train.lock import RunLock
from capsdist.train.tracking import Tracker, start_trackers, wandb_settings
from capsdist.train.step import TrainStep

log = logging.getLogger("capsdist")


class Trainer:
    """Builds the run (accelerator, data, model, optimizer, tracker), restores a checkpoint, trains."""

    def __init__(self, cfg: Config, *, source: str = "config", resume: str = "auto"):
        self.cfg, self.source = cfg, source
        self.run_dir = Path(cfg.run_dir)
        check_writable_dir(self.run_dir)  # a file in the way, a read-only place, a full disk: now, before any work
        self.lock = RunLock(self.run_dir)  # held by rank 0 until fit() ends (capsdist/train/lock.py)
        try:
            self._build(resume)
        except BaseException:
            self.lock.release()
            raise

    def _build(self, resume: str) -> None:
        cfg = self.cfg
        holder = self.lock.acquire() if _is_main_env() else None  # before anything is written into the run dir
        if holder is None:  # a trainer that will stop leaves the run's folders alone
            check_writable_dir(checkpoint.checkpoint_dir(self.run_dir))  # now, not at the first save
        wandb_kwargs = None if holder else wandb_settings(cfg, self.run_dir, is_main=_is_main_env())
        self.accelerator = acc = make_accelerator(cfg, log_with="wandb" if wandb_kwargs else None)
        self._stop_if_locked(holder)
        log.setLevel(logging.INFO if acc.is_main_process else logging.WARNING)
        self.world = acc.num_processes
        if cfg.train.batch_size % self.world:
            raise ConfigError(
                f"{self.source}: train.batch_size: {cfg.train.batch_size} is not divisible by the "
                f"{self.world} processes; use a multiple of {self.world}"
            )
        eval_batch = cfg.eval.batch_size or cfg.train.batch_size
        if eval_batch % self.world:
            raise ConfigError(
                f"{self.source}: eval.batch_size: {eval_batch} is not divisible by the "
                f"{self.world} processes; use a multiple of {self.world}"
            )
        self.per_rank_batch, self.eval_per_rank = cfg.train.batch_size // self.world, eval_batch // self.world
        self.resume_from = checkpoint.agree(acc, lambda: self._resume_path(resume))  # before anything is pruned
        if cfg.checkpoint.best_metric == "test_accuracy":
            log.warning(
                "checkpoint.best_metric is test_accuracy: `best` is selected on the TEST split, so its "
                "test accuracy is optimistic; use val_accuracy for an honest estimate"
            )

        if cfg.data.num_workers == "auto":  # resolved once per run: the data order depends on the worker count
            saved = self._run_workers()
            cfg.data.num_workers = threads.budget("auto").workers if saved is None else saved
        self.opts = data_options(cfg)
        threads.apply(threads.budget(self.opts.num_workers), log)
        self.manifest = load_data(cfg, acc, self.opts)
        self.data = data_identity(self.manifest, self.opts)  # recorded in every checkpoint, checked on resume
        self.classes = list(self.manifest.classes)
        self.steps_per_epoch = steps_per_epoch(self.manifest, self.opts, cfg.train.batch_size)
        # The learning-rate schedule spans train.epochs: train.max_steps stops a run early without bending its
        # curve, so a run stopped that way resumes on the same schedule as one that never stopped.
        schedule_steps = cfg.train.epochs * self.steps_per_epoch
        self.schedule_images = schedule_steps * cfg.train.batch_size
        self.total_steps = min(cfg.train.max_steps, schedule_steps) if cfg.train.max_steps else schedule_steps

        set_seed(cfg.train.seed)
        model = model_for_data(cfg, self.manifest, self.opts)
        self.loss_fn = make_loss(
            cfg.loss.name, margin_schedule=cfg.loss.margin_schedule, max_margin_images=cfg.loss.max_margin_images
        )
        self.step = TrainStep.prepare(acc, model, cfg, self.loss_fn, self.schedule_images)
        self.model, self.optimizer = self.step.model, self.step.optimizer
        self.state = TrainState(batch_size=cfg.train.batch_size, world_size=self.world)
        if self.resume_from is not None:
            self._restore()
        checkpoint.abandon_newer(acc, self.run_dir, self.state)  # whatever is newer than where this run starts
        if acc.is_main_process:
            self._save_config()
        if wandb_kwargs:
            start_trackers(acc, cfg, wandb_kwargs)
        self.tracker = Tracker(acc, self.run_dir, wandb_enabled=wandb_kwargs is not None)
        self._signal: str | None = None  # a signal this process received
        self._stop = False  # all ranks agreed to stop (set from the step's all-reduce)
        self._nonfinite_run = 0  # consecutive skipped steps
        self._pending: list[_StepRecord] = []  # steps whose reduced values are still on the device
        self._grad_norms: dict[str, torch.Tensor] = {}  # of the last log step's backward, on the device
        self.class_health = ClassHealthMonitor(cfg.logging.health_warn_steps)
        self._checkpoint = self.resume_from  # the last checkpoint written or resumed from ...
        self._checkpoint_state = self.state.state_dict() if self.resume_from is not None else None  # ... its state

    def _stop_if_locked(self, holder: str | None) -> None:
        """Every rank stops at once (ConfigError) when rank 0 found the run directory held by another trainer."""
        (holder,) = broadcast_object_list([holder])
        if holder:
            raise ConfigError(
                f"{self.run_dir} is in use by another trainer ({holder}); wait for it to end or stop it, "
                "or give this run another --run-dir"
            )

    def _resume_path(self, resume: str) -> Path | None:
        """The checkpoint `--resume` names (auto: the newest that verifies, or None), as rank 0 sees the run dir."""
        if resume == "none":
            if checkpoint.step_dirs(self.run_dir):
                raise ConfigError(
                    f"{self.run_dir}: already holds checkpoints; continue it with --resume auto "
                    "or start elsewhere with --run-dir"
                )
            return None
        if resume == "auto":
            return checkpoint.latest(self.run_dir)
        return checkpoint.resolve(self.run_dir, resume)

    def _run_workers(self) -> int | None:
        """The loader worker count a resumed run was started with (its saved config.yaml), so that `auto` on a
        machine with other cores continues the same data order; None for a new run."""
        path = self.run_dir / "config.yaml"
        if self.resume_from is None or not path.is_file():
            return None
        saved = (yaml.safe_load(path.read_text()) or {}).get("data", {}).get("num_workers")
        return saved if isinstance(saved, int) and not isinstance(saved, bool) else None

    def _restore(self) -> None:
        check_same_data(checkpoint.read_data(self.resume_from), self.data, str(self.resume_from))
        self.state = checkpoint.load(self.accelerator, self.resume_from)
        if self.state.batch_size != self.cfg.train.batch_size:
            raise CheckpointError(
                f"{self.resume_from}: written with train.batch_size {self.state.batch_size}, "
                f"the config says {self.cfg.train.batch_size}; global batch must not change on resume"
            )
        if self.state.world_size != self.world:
            log.warning(
                "resuming a %d-process checkpoint on %d processes: continuing at global sample %d",
                self.state.world_size,
                self.world,
                self.state.samples_seen,
            )
        self.state.world_size = self.world
        log.info(
            "resumed from %s at step %d (epoch %d, batch %d)",
            self.resume_from,
            self.state.step,
            self.state.epoch,
            self.state.batch_in_epoch,
        )

    def _save_config(self) -> None:
        path = self.run_dir / "config.yaml"
        if path.is_file():
            before = yaml.safe_load(path.read_text())
            changed = _diff(before, config_dict(self.cfg))
            if changed:
                log.warning("config differs from this run directory's config.yaml in: %s", ", ".join(changed))
        save_config(self.cfg, path)

    # ---------------------------------------------------------------- the loop

    def fit(self) -> dict:
        """Train to the configured end (or a stop signal); returns the last evaluation's metrics. The run
        directory's lock is released when it returns, however it ends."""
        try:
            return self._fit()
        finally:
            self.lock.release()

    def _fit(self) -> dict:
        acc, state = self.accelerator, self.state
        previous = {sig: signal.signal(sig, self._on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
        self.tracker.log(
            {"event/start": 1, "world_size": self.world, "per_rank_batch": self.per_rank_batch}, state.step
        )
        bar = tqdm(
            total=self.total_steps, initial=state.step, disable=not acc.is_main_process, unit="step", dynamic_ncols=True
        )
        last_eval: dict = {}
        try:
            while state.step < self.total_steps and not self._stop:
                last_eval = self._run_epoch(bar) or last_eval
            if not self._stop and last_eval.get("step") != state.step:
                last_eval = self._evaluate_and_save()
            self._save()
        except RuntimeError as err:
            if not _peer_lost(err):
                raise
            raise TrainingError(
                f"no answer from another process within train.collective_timeout_s="
                f"{self.cfg.train.collective_timeout_s} s, or it died ({str(err).splitlines()[0]}); "
                f"the checkpoints are kept: once every process is healthy, resume with {resume_hint(self.run_dir)}"
            ) from None
        finally:
            bar.close()
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        self.tracker.finish()
        if acc.is_main_process:
            print(self._summary(last_eval))
        return last_eval

    def _run_epoch(self, bar: tqdm) -> dict:
        """Train from the data position to the epoch end (or total_steps / stop); evaluate and save at its end."""
        state, cfg = self.state, self.cfg
        loader = train_loader(
            self.manifest,
            self.opts,
            epoch=state.epoch,
            rank=self.accelerator.process_index,
            world_size=self.world,
            per_rank_batch=self.per_rank_batch,
            start_batch=state.batch_in_epoch,
        )  # a resumed epoch skips, without decoding,
        batches = iter(loader)  # the batches already trained on
        last_eval: dict = {}
        window, tick = _Window(), time.perf_counter()
        while state.batch_in_epoch < self.steps_per_epoch:
            try:
                batch = next(batches)
            except StopIteration:
                raise TrainingError(
                    f"epoch {state.epoch} gave {state.batch_in_epoch} batches, expected "
                    f"{self.steps_per_epoch}: did the shards change under the run?"
                ) from None
            except Exception:
                if self._signal is None:
                    raise
                self._stop = True  # the signal also killed the loader's workers; state is at a step boundary
                return last_eval
            self._train_step(batch)
            now = time.perf_counter()
            window.add(now - tick, cfg.train.batch_size)
            bar.update(1)
            if state.step % cfg.logging.every_steps == 0:
                window.last_loss = self._flush()
                if window.last_loss is None:  # a skipped step's gradients are not finite: no norms to log
                    self._grad_norms = {}
                self.tracker.log(self._throughput(window), state.step)
                loss_text = "skipped" if window.last_loss is None else f"{window.last_loss:.4f}"
                bar.set_postfix(loss=loss_text, img_s=f"{window.images_per_s:.1f}")
                window = _Window()
            if self._stop:
                self._save()
                return last_eval
            if state.batch_in_epoch == self.steps_per_epoch:
                break
            if cfg.eval.every_steps and state.step % cfg.eval.every_steps == 0:
                last_eval = self._evaluate_and_save()
            elif cfg.checkpoint.every_steps and state.step % cfg.checkpoint.every_steps == 0:
                self._save()
            if state.step >= self.total_steps:
                return last_eval
            tick = time.perf_counter()
        self._flush()  # the epoch's skipped samples are counted in it
        state.epoch, state.batch_in_epoch, state.epoch_skipped = state.epoch + 1, 0, 0
        return self._evaluate_and_save()

    def _train_step(self, batch) -> None:
        """One global step on this rank's batch (TrainStep), queued for the next host step without a device read."""
        state, batch_size = self.state, self.cfg.train.batch_size
        out = self.step(
            batch.images,
            batch.labels,
            state.step * batch_size,  # images before this step: the schedules' clock
            skipped=batch.skipped,
            stop=self._signal is not None,
            grad_norms=(state.step + 1) % self.cfg.logging.every_steps == 0,  # a log step
        )
        if out.grad_norms:  # of a log step
            self._grad_norms = out.grad_norms
        state.step += 1
        state.batch_in_epoch += 1
        state.samples_seen += batch_size
        self._pending.append(_StepRecord(state.step, state.epoch, out.lr, out.margin, out.values))
        if self.world == 1 and self._signal:  # a local flag: no device read needed to agree
            self._stop = True

    def _flush(self) -> float | None:
        """Read the steps since the last host step (one device read), log each, count non-finite steps and
        skipped samples. Returns the last step's mean loss (None if skipped); raises TrainingError after
        train.max_nonfinite non-finite steps in a row or too many skipped samples."""
        if not self._pending:
            return None
        records, self._pending = self._pending, []
        batch_size, state, last = self.cfg.train.batch_size, self.state, None
        values_per_step = torch.stack([r.values for r in records]).tolist()
        for record, (nonfinite, stop, correct, loss_sum, skipped, skipped_step) in zip(records, values_per_step):
            if skipped_step:
                state.nonfinite_total += 1
                self._nonfinite_run += 1
                log.warning(
                    "step %d: %s, step skipped (%d in a row)",
                    record.step,
                    f"non-finite loss on {int(nonfinite)} rank(s)" if nonfinite else "non-finite gradients",
                    self._nonfinite_run,
                )
            else:
                self._nonfinite_run = 0
            self._stop = self._stop or bool(stop)
            last = None if skipped_step else loss_sum / batch_size
            values = {
                "train/loss": None if nonfinite else loss_sum / batch_size,
                "train/accuracy": correct / batch_size,
                "lr": record.lr,
                "epoch": record.epoch,
                "train/nonfinite_total": state.nonfinite_total,
                **self._count_skipped(int(skipped), record.step),
            }
            if not math.isnan(record.margin):
                values["margin"] = record.margin
            self.tracker.log(values, record.step)
            if self._nonfinite_run >= self.cfg.train.max_nonfinite:
                raise TrainingError(
                    f"{self._nonfinite_run} non-finite steps in a row at step {record.step}, none of them "
                    f"checkpointed; {self._last_healthy()}. Lower optim.lr or set optim.grad_clip, then continue "
                    f"with {resume_hint(self.run_dir)}"
                )
        return last

    def _count_skipped(self, skipped: int, step: int) -> dict:
        """Count corrupt samples skipped at global `step` (all ranks); warn on the first; TrainingError when the
        epoch has lost more than data.max_skipped_fraction of its samples. Returns the values to log."""
        state, limit = self.state, self.cfg.data.max_skipped_fraction
        if skipped and not state.skipped_total:
            log.warning(
                "step %d: %d corrupt training samples skipped (data.skip_corrupt); their slots repeat good "
                "samples; prepare the dataset again: %s",
                step,
                skipped,
                self.manifest.prepare_command(),
            )
        state.skipped_total += skipped
        state.epoch_skipped += skipped
        epoch_samples = self.steps_per_epoch * self.cfg.train.batch_size
        if state.epoch_skipped > limit * epoch_samples:
            raise TrainingError(
                f"epoch {state.epoch}: {state.epoch_skipped} corrupt training samples skipped, more "
                f"than data.max_skipped_fraction {limit} of its {epoch_samples}; prepare the dataset "
                f"again ({self.manifest.prepare_command()}) or raise data.max_skipped_fraction"
            )
        return {"train/skipped": skipped, "train/skipped_total": state.skipped_total}

    def _throughput(self, window: "_Window") -> dict:
        values = {
            "perf/images_per_s": window.images_per_s,
            "perf/images_per_s_per_process": window.images_per_s / self.world,
            "perf/step_time_s": window.seconds / window.steps,
            "perf/peak_memory_mb": _peak_memory_mb(self.accelerator),
        }
        stats = self.accelerator.unwrap_model(self.model).health_stats()
        for layer, layer_stats in stats.items():
            for key, value in layer_stats.items():
                values[f"health/{layer}/{key}"] = value
        if "classcaps" in stats:
            self.class_health.update(stats["classcaps"], self.state.step)
        values.update({key: float(value) for key, value in self._grad_norms.items()})
        self._grad_norms = {}
        return values

    # ---------------------------------------------------------------- evaluation and checkpoints

    def _evaluate_and_save(self) -> dict:
        """Evaluate val (and test); log; write a step checkpoint; update `best` when it improved."""
        self._flush()
        state, cfg = self.state, self.cfg
        model = self.accelerator.unwrap_model(self.model)
        metrics: dict = {"step": state.step}
        for split in ["val", "test"] if cfg.eval.test else ["val"]:
            loader = eval_loader(
                self.manifest,
                self.opts,
                split,
                rank=self.accelerator.process_index,
                world_size=self.world,
                per_rank_batch=self.eval_per_rank,
            )
            result = evaluate(
                self.accelerator,
                model,
                loader,
                self.loss_fn,
                state.step * cfg.train.batch_size,
                len(self.classes),
                cfg.eval.misclassified_images,
            )
            metrics[f"{split}_accuracy"] = result["accuracy"]
            self.tracker.log(
                {
                    f"{split}/accuracy": result["accuracy"],
                    f"{split}/loss": result["loss"],
                    f"{split}/count": result["count"],
                },
                state.step,
            )
            self.tracker.log_eval_media(split, result, self.classes, state.step)
        score = metrics[cfg.checkpoint.best_metric]
        improved = score > state.best_metric and not self._nonfinite_run  # no checkpoint to copy in a streak
        if improved:
            state.best_metric, state.best_step = score, state.step
        path = self._save()
        if improved:
            checkpoint.copy_to_best(self.accelerator, path)
        return metrics

    def _save(self) -> Path | None:
        """Write the step checkpoint, once per state: again at a step already saved when the state changed since
        (the evaluation after a periodic checkpoint found a new `best`). None while the last steps were skipped as
        non-finite: the weights that made them so may be poisoned though finite, and retention would prune the
        healthy checkpoints for them. NaN weights are refused."""
        self._flush()
        if self._nonfinite_run:
            log.warning(
                "step %d: not checkpointing after %d non-finite steps in a row; %s",
                self.state.step,
                self._nonfinite_run,
                self._last_healthy(),
            )
            return None
        if self._checkpoint_state == self.state.state_dict():
            return self._checkpoint
        checkpoint.assert_finite(self.accelerator.unwrap_model(self.model))
        path = checkpoint.save(self.accelerator, self.run_dir, self.state, self.cfg.checkpoint.keep_last, self.data)
        self._checkpoint, self._checkpoint_state = path, self.state.state_dict()
        return path

    def _last_healthy(self) -> str:
        """Names the checkpoint a run stopped by non-finite steps continues from: the last one written or resumed."""
        if self._checkpoint is None:
            return "no checkpoint was written before them"
        return f"the last healthy checkpoint is {self._checkpoint} (step {self._checkpoint_state['step']})"

    def _on_signal(self, signum, frame) -> None:
        self._signal = signal.Signals(signum).name

    def _summary(self, metrics: dict) -> str:
        parts = [f"{k.replace('_', ' ')} {v:.4f}" for k, v in metrics.items() if k.endswith("accuracy")]
        head = f"capsdist: stopped by {self._signal or 'a signal to another rank'}" if self._stop else "capsdist: done"
        tail = f"; resume with {resume_hint(self.run_dir)}" if self._stop else ""
        procs = f"{self.world} process{'es' if self.world > 1 else ''}"
        return (
            f"{head} at step {self.state.step} ({procs}): {', '.join(parts) or 'no evaluation'}; "
            f"checkpoints in {checkpoint.checkpoint_dir(self.run_dir)}{tail}"
        )


class _StepRecord(NamedTuple):
    """A step's host values and, still on the device, its all-reduced (nonfinite, stop, correct, loss sum, skipped)
    and whether its update was skipped."""

    step: int
    epoch: int
    lr: float
    margin: float
    values: torch.Tensor  # (6,) float64


class _Window:
    """Step timings (data wait included) since the last throughput log, and the last loss read (None: skipped)."""

    def __init__(self):
        self.steps, self.seconds, self.images, self.last_loss = 0, 0.0, 0, None

    def add(self, seconds: float, images: int) -> None:
        self.steps, self.seconds, self.images = self.steps + 1, self.seconds + seconds, self.images + images

    @property
    def images_per_s(self) -> float:
        return self.images / max(self.seconds, 1e-9)


def _peak_memory_mb(accelerator: Accelerator) -> float:
    if accelerator.device.type == "cuda":
        return torch.cuda.max_memory_allocated(accelerator.device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def _peer_lost(err: RuntimeError) -> bool:
    """Whether a collective failed because another rank timed out or died (gloo: RuntimeError, NCCL: DistError)."""
    return isinstance(err, torch.distributed.DistError) or "gloo" in str(err)


def resume_hint(run_dir: Path) -> str:
    """The launch/train.py arguments that continue the run in `run_dir`, shell-quoted."""
    return shlex.join(["--resume", "auto", "--run-dir", str(run_dir)])


def _is_main_env() -> bool:
    """Rank 0 before the Accelerator exists (torchrun/accelerate set RANK)."""
    return os.environ.get("RANK", "0") == "0"


def _diff(before: dict, after: dict, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two nested config dicts."""
    keys = []
    for key in sorted(set(before) | set(after)):
        a, b = before.get(key), after.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            keys += _diff(a, b, f"{prefix}{key}.")
        elif a != b:
            keys.append(f"{prefix}{key}")
    return keys
