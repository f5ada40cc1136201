"""The training loop: Accelerate DDP, mixed precision, global-step schedules, exact resume.

One `Trainer(cfg).fit()` call runs on every process; rank 0 holds the run directory's lock from the start to the
end of it (capsdist/train/lock.py). The Trainer builds the run and loops over global steps. A step
(capsdist/train/step.py) never waits for the device: each rank takes its per_rank_batch = batch_size / world_size
samples, one all-reduce combines the ranks' loss, correct count, non-finite flag, skipped corrupt samples and stop
request (SIGTERM/SIGINT), and the skip of a step whose loss (any rank) or gradients are non-finite is decided on the
device. After each step the parts whose step it is act (its host step): the metrics logger (train/metrics.py)
reads all the steps since the last host step at once, logs each and counts non-finite steps and skipped samples
(train/health.py); a stop request read there checkpoints and ends the run (so in a multi-process run it takes
effect at the next host step); otherwise the epoch's end moves the data position on, and the evaluator
(train/evaluator.py) and the checkpointer (train/checkpointer.py) each answer whether the step is theirs. The data
position (epoch, batches consumed) lives in `TrainState`; a resumed run recreates that epoch's loader and skips the
consumed batches, which continues exactly on the same world size and at the same global sample count on another.
"""

from __future__ import annotations

import logging
import os
import signal
from pathlib import Path

import torch
import yaml
from accelerate.utils import broadcast_object_list, set_seed

from capsdist.core import threads
from capsdist.core.cpu_share import CpuShare
from capsdist.config import Config, changed_keys, config_dict, save_config
from capsdist.data import check_same_data, data_identity, steps_per_epoch, train_loader
from capsdist.core.errors import CheckpointError, ConfigError, TrainingError
from capsdist.core.files import check_writable_dir
from capsdist.model.loss import make_loss
from capsdist.train.build import data_options, load_data, make_accelerator, model_for_data
from capsdist.train import checkpoint
from capsdist.train.checkpoint import TrainState
from capsdist.train.checkpointer import Checkpointer, resume_hint
from capsdist.train.evaluator import Evaluator
from capsdist.train.health import StepHealth
from capsdist.train.lock import RunLock
from capsdist.train.metrics import MetricsLogger, StepRecord
from capsdist.train.step import TrainStep
from capsdist.train.tracking import Tracker, start_trackers, wandb_settings

log = logging.getLogger("capsdist")


class Trainer:
    """Builds the run (accelerator, data, the step, the parts that act at their steps), restores a checkpoint, and
    loops over the steps."""

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
        self.per_rank_batch = self._per_rank("train.batch_size", cfg.train.batch_size)
        eval_per_rank = self._per_rank("eval.batch_size", cfg.eval.batch_size or cfg.train.batch_size)
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
        plan = threads.budget(self.opts.num_workers)
        threads.apply(plan, log)
        self.cpu_share = CpuShare(plan.threads, log, on_cpu=acc.device.type == "cpu").start()
        log.info(self.cpu_share.describe())
        self.manifest = load_data(cfg, acc, self.opts)
        self.data = data_identity(self.manifest, self.opts)  # recorded in every checkpoint, checked on resume
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
        self._build_parts(eval_per_rank)
        self._batches = None  # the epoch's batches, from its loader made at the data position
        self._signal: str | None = None  # a signal this process received
        self._stop = False  # all ranks agreed to stop (set from the step's all-reduce)

    def _build_parts(self, eval_per_rank: int) -> None:
        """The parts that act at their steps: checkpointer, evaluator, the health of the steps, metrics logger."""
        acc, cfg, model = self.accelerator, self.cfg, self.accelerator.unwrap_model(self.model)
        self.checkpointer = Checkpointer(
            acc, model, self.run_dir, cfg.checkpoint, self.data, self.state, self.resume_from
        )
        self.evaluator = Evaluator(acc, model, self.manifest, self.opts, cfg, self.loss_fn, self.tracker, eval_per_rank)
        self.health = StepHealth(
            self.state,
            cfg,
            self.steps_per_epoch * cfg.train.batch_size,
            self.manifest.prepare_command(),
            self.checkpointer.last_healthy,
            resume_hint(self.run_dir),
        )
        self.metrics = MetricsLogger(acc, model, self.tracker, self.health, cfg)

    def _per_rank(self, key: str, batch_size: int) -> int:
        """The share of each process of the global `batch_size` (config `key`); ConfigError when it does not divide."""
        if batch_size % self.world:
            raise ConfigError(
                f"{self.source}: {key}: {batch_size} is not divisible by the "
                f"{self.world} processes; use a multiple of {self.world}"
            )
        return batch_size // self.world

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
            changed = changed_keys(before, config_dict(self.cfg))
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
            self.cpu_share.close()
            self.lock.release()

    def _fit(self) -> dict:
        previous = {sig: signal.signal(sig, self._on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
        start = {"world_size": self.world, "per_rank_batch": self.per_rank_batch}
        self.metrics.start(self.state.step, self.total_steps, start)
        try:
            self._train()
        except RuntimeError as err:
            if not _peer_lost(err):
                raise
            raise TrainingError(
                f"no answer from another process within train.collective_timeout_s="
                f"{self.cfg.train.collective_timeout_s} s, or it died ({str(err).splitlines()[0]}); "
                f"the checkpoints are kept: once every process is healthy, resume with {resume_hint(self.run_dir)}"
            ) from None
        finally:
            self.metrics.close()
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        self.tracker.finish()
        if self.accelerator.is_main_process:
            print(self._summary(self.evaluator.last))
        return self.evaluator.last

    def _train(self) -> None:
        """Global steps, each followed by its host step, up to the last step (train.max_steps or train.epochs) or
        a stop request."""
        state = self.state
        while state.step < self.total_steps and not self._stop:
            if state.batch_in_epoch == self.steps_per_epoch:  # resumed from a stop at an epoch's last step
                self._end_epoch()
            batch = self._next_batch()
            if batch is None:  # the signal also stopped the loader's workers; state is at a step boundary
                self._stop = True
                self._read_steps()
                self._save()
                return
            self._train_step(batch)
            self._host_step()
            self.metrics.resume_clock()
        if not self._stop and self.evaluator.should_evaluate(state.step, epoch_end=False, last_step=True):
            self._evaluate_and_save()  # resumed at the last step: no step was taken

    def _next_batch(self):
        """This rank's next batch of the epoch; None when a stop signal stopped the loader too. The epoch's loader is
        made at the data position: a resumed epoch skips the batches already trained on, without decoding them."""
        state = self.state
        if self._batches is None:
            self._batches = iter(
                train_loader(
                    self.manifest,
                    self.opts,
                    epoch=state.epoch,
                    rank=self.accelerator.process_index,
                    world_size=self.world,
                    per_rank_batch=self.per_rank_batch,
                    start_batch=state.batch_in_epoch,
                )
            )
        try:
            return next(self._batches)
        except StopIteration:
            raise TrainingError(
                f"epoch {state.epoch} gave {state.batch_in_epoch} batches, expected "
                f"{self.steps_per_epoch}: did the shards change under the run?"
            ) from None
        except Exception:
            if self._signal is None:
                raise
            return None

    def _train_step(self, batch) -> None:
        """One global step on this rank's batch (TrainStep), queued for the next host step without a device read."""
        state, batch_size = self.state, self.cfg.train.batch_size
        self.cpu_share.tick()
        out = self.step(
            batch.images,
            batch.labels,
            state.step * batch_size,  # images before this step: the schedules' clock
            skipped=batch.skipped,
            stop=self._signal is not None,
            grad_norms=self.metrics.should_log(state.step + 1),
        )
        state.step += 1
        state.batch_in_epoch += 1
        state.samples_seen += batch_size
        self.metrics.add(StepRecord(state.step, state.epoch, out.lr, out.margin, out.values), out.grad_norms)
        if self.world == 1 and self._signal:  # a local flag: no device read needed to agree
            self._stop = True

    def _host_step(self) -> None:
        """After a step, the parts whose step it is, in this order: the logger reads the steps since the last host
        step (one device read) and logs; a stop request checkpoints; or the epoch ends, the evaluator evaluates
        (then a checkpoint, for `best`), or the checkpointer saves."""
        state = self.state
        step, epoch_end, last = state.step, state.batch_in_epoch == self.steps_per_epoch, state.step >= self.total_steps
        log_step = self.metrics.should_log(step)
        evaluate = self.evaluator.should_evaluate(step, epoch_end, last)
        save = self.checkpointer.should_save(step, epoch_end, last)
        if not (log_step or evaluate or save or self._stop):
            return
        self._read_steps()
        if log_step:
            self.metrics.log_progress(step)
        if self._stop:
            self._save()
        elif epoch_end:
            self._end_epoch()
        elif evaluate:
            self._evaluate_and_save()
        elif save:
            self._save()

    def _read_steps(self) -> None:
        """The logger reads the steps not yet read; a stop request among them stops every rank."""
        self.metrics.flush()
        self._stop = self._stop or self.metrics.stop_requested

    def _end_epoch(self) -> None:
        """The epoch's last step is done: the data position moves to the next epoch; evaluate and save there."""
        state = self.state
        state.epoch, state.batch_in_epoch, state.epoch_skipped = state.epoch + 1, 0, 0
        self._batches = None
        self._evaluate_and_save()

    def _evaluate_and_save(self) -> None:
        metrics = self.evaluator.evaluate(self.state.step, self.state.step * self.cfg.train.batch_size)
        self.checkpointer.save(self.state, self.health.nonfinite_run, metrics)

    def _save(self) -> None:
        self.checkpointer.save(self.state, self.health.nonfinite_run)

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


def _peer_lost(err: RuntimeError) -> bool:
    """Whether a collective failed because another rank timed out or died (gloo: RuntimeError, NCCL: DistError)."""
    return isinstance(err, torch.distributed.DistError) or "gloo" in str(err)


def _is_main_env() -> bool:
    """Rank 0 before the Accelerator exists (torchrun/accelerate set RANK)."""
    return os.environ.get("RANK", "0") == "0"
