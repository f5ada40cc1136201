"""Tracking: W&B through Accelerate's tracker, and run_dir/metrics.jsonl always.

`wandb_settings` decides the W&B mode before wandb is first set up (WANDB_MODE must be set
before that): a WANDB_MODE in the environment wins over logging.wandb.mode, and "online" without
credentials becomes "offline". `start_wandb` bounds wandb.init's wait for the server
(logging.wandb.init_timeout_s) and, when an online server cannot be reached, starts the run offline
instead. An offline run prints its `wandb sync` command at the end. The run id is stored in
run_dir/wandb_id.txt so a resumed run continues
the same W&B run; every log call passes the global step restored from the checkpoint, because
an offline resume starts a new run folder whose own step counter begins at 0.

metrics.jsonl holds one JSON object per line: {"step": global step, "key": value, ...};
a resumed run appends, so a step redone after a crash appears again (readers keep the last).
"""

from __future__ import annotations

import json
import netrc
import os
import re
import shlex
import uuid
from pathlib import Path
from typing import Callable, TypeVar
from urllib.parse import urlparse

import numpy as np
from accelerate import Accelerator

from capsdist.config import Config, config_dict
from capsdist.core.errors import ConfigError
from capsdist.core.files import check_writable_dir, write_atomic, writing

MODES = ("online", "offline", "disabled")
_RUN_ID = re.compile(r"[A-Za-z0-9_.-]{1,128}")  # what a W&B run id may hold (capsdist writes 12 hex digits)
T = TypeVar("T")


def _has_credentials() -> bool:
    """True when wandb can authenticate without a prompt (WANDB_API_KEY, identity token, or netrc)."""
    if os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_IDENTITY_TOKEN_FILE"):
        return True
    host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname
    try:
        return netrc.netrc(os.environ.get("NETRC")).authenticators(host) is not None
    except (OSError, netrc.NetrcParseError):
        return False


def wandb_settings(cfg: Config, run_dir: Path, is_main: bool) -> dict | None:
    """W&B init kwargs for this run (mode resolved, id kept in run_dir), or None when disabled.

    Sets WANDB_MODE and WANDB_SILENT in the environment; call before the Accelerator is created.
    """
    mode = _mode(cfg, is_main)
    if mode == "online" and not _has_credentials():
        mode = "offline"
        if is_main:
            print("capsdist: no W&B credentials found (wandb login / WANDB_API_KEY): logging offline")
    if mode == "disabled":
        return None
    os.environ["WANDB_MODE"] = mode
    os.environ.setdefault("WANDB_SILENT", "true")
    run_id = _run_id(run_dir) if is_main else None
    if is_main:
        check_writable_dir(run_dir / "wandb")  # wandb's own folder: a message now, not a traceback from wandb.init
    wb = cfg.logging.wandb
    settings = {
        "id": run_id,
        "resume": "allow",
        "name": wb.name or run_dir.name,
        "entity": wb.entity or None,
        "tags": wb.tags or None,
        "dir": str(run_dir),
        "mode": mode,
    }
    if "WANDB_INIT_TIMEOUT" not in os.environ:  # the environment wins here too
        settings["settings"] = {"init_timeout": wb.init_timeout_s}
    return settings


def _run_id(run_dir: Path) -> str:
    """The W&B run id kept in run_dir/wandb_id.txt, so that a resumed run continues the same W&B run; a new one,
    written atomically, when there is none, or when the file is empty or holds no id (said in a message)."""
    path = run_dir / "wandb_id.txt"
    if path.is_file():
        found = path.read_text(errors="replace").strip()
        if _RUN_ID.fullmatch(found):
            return found
        print(f"capsdist: {path} holds no W&B run id ({found[:40]!r}): this run logs to a new W&B run")
    run_id = uuid.uuid4().hex[:12]
    write_atomic(path, run_id.encode())
    return run_id


def _mode(cfg: Config, is_main: bool) -> str:
    """logging.wandb.mode, or WANDB_MODE when the environment sets it (ConfigError for a mode capsdist lacks)."""
    mode, env = cfg.logging.wandb.mode, os.environ.get("WANDB_MODE")
    if not env:
        return mode
    if env not in MODES:
        raise ConfigError(
            f"WANDB_MODE={env} in the environment: capsdist takes {', '.join(MODES)}; set one or unset it"
        )
    if env != mode and is_main:
        print(f"capsdist: WANDB_MODE={env} in the environment overrides logging.wandb.mode={mode}")
    return env


def start_wandb(start: Callable[[dict], T], settings: dict) -> T:
    """`start(settings)`, a call of wandb.init with these kwargs (from `wandb_settings`); when an online W&B server
    cannot be reached in time (or refuses the run), say so, end wandb's session and `start` again offline
    (settings["mode"] and WANDB_MODE become offline). Returns what `start` returns."""
    import wandb

    try:
        return start(settings)
    except (wandb.errors.Error, TimeoutError) as err:
        if settings["mode"] != "online":
            raise
        print(f"capsdist: W&B cannot be reached ({str(err).splitlines()[0]}): logging offline")
        wandb.teardown()  # the failed run keeps its id in use until wandb's session ends
        os.environ["WANDB_MODE"] = settings["mode"] = "offline"
        return start(settings)


def start_trackers(accelerator: Accelerator, cfg: Config, settings: dict) -> None:
    """Accelerate's W&B tracker for this run, with `settings` from `wandb_settings` (offline if W&B cannot be
    reached: `start_wandb`)."""

    def start(kwargs: dict) -> None:
        accelerator.trackers.clear()  # a tracker whose start failed stays in the list
        accelerator.init_trackers(cfg.logging.wandb.project, config=config_dict(cfg), init_kwargs={"wandb": kwargs})

    start_wandb(start, settings)


def sync_message(folder: Path) -> str:
    """What an offline W&B run prints at its end: the command that uploads `folder`."""
    return f"capsdist: W&B run saved offline; upload it with: {shlex.join(['wandb', 'sync', str(folder)])}"


class Tracker:
    """Scalar and media logging on rank 0: metrics.jsonl always, W&B when enabled."""

    def __init__(self, accelerator: Accelerator, run_dir: Path, wandb_enabled: bool):
        self.accelerator = accelerator
        self.wandb = wandb_enabled
        self.path = run_dir / "metrics.jsonl"
        self._file = None
        self._finished = False
        if accelerator.is_main_process:
            with writing(self.path):
                self._file = open(self.path, "a")

    def log(self, values: dict[str, float], step: int) -> None:
        """Log scalars at global `step` to metrics.jsonl and W&B (rank 0 only)."""
        if self._file is None:
            return
        self._write({"step": step, **values})
        if self.wandb:
            self.accelerator.log({k: v for k, v in values.items() if v is not None}, step=step)

    def log_eval_media(self, split: str, result: dict, class_names: list[str], step: int) -> None:
        """Confusion matrix (also to metrics.jsonl) and misclassified images of one evaluation."""
        if self._file is None:
            return
        self._write({"step": step, f"{split}/confusion_matrix": result["confusion"]})
        if not self.wandb:
            return
        import wandb

        confusion = np.asarray(result["confusion"])  # (K, K), rows = true class
        true, pred = np.nonzero(confusion)
        counts = confusion[true, pred]
        media = {
            f"{split}/confusion_matrix": wandb.plot.confusion_matrix(
                y_true=np.repeat(true, counts).tolist(),
                preds=np.repeat(pred, counts).tolist(),
                class_names=class_names,
                title=f"{split} confusion matrix",
            )
        }
        if result["misclassified"]:
            media[f"{split}/misclassified"] = [
                wandb.Image(_to_image(img), caption=f"true {class_names[t]}, predicted {class_names[p]}")
                for img, t, p in result["misclassified"]
            ]
        self.accelerator.log(media, step=step)

    def _write(self, record: dict) -> None:
        """One line of metrics.jsonl, flushed (StorageError when the disk is full)."""
        with writing(self.path):
            self._file.write(json.dumps(record) + "\n")
            self._file.flush()

    def finish(self) -> None:
        """On every rank, end the Accelerate run (W&B, if on, and the process group: a gloo/NCCL group left to
        interpreter exit can abort the process); on rank 0, close metrics.jsonl and print the sync command of an
        offline W&B run. Once: a second call does nothing."""
        if self._finished:
            return
        self._finished = True
        offline_dir = None
        if self._file is not None:  # rank 0; every rank ends its process group below
            self._file.close()
            self._file = None
            if self.wandb and os.environ.get("WANDB_MODE") == "offline":
                offline_dir = Path(self.accelerator.get_tracker("wandb", unwrap=True).dir).parent
        self.accelerator.end_training()
        if offline_dir is not None:
            print(sync_message(offline_dir))


def _to_image(image: np.ndarray) -> np.ndarray:
    """(C, H, W) float image -> (H, W) or (H, W, 3) uint8 for display, min-max scaled."""
    lo, hi = float(image.min()), float(image.max())
    scaled = ((image - lo) / max(hi - lo, 1e-8) * 255).astype(np.uint8)
    if scaled.shape[0] == 1:
        return scaled[0]
    if scaled.shape[0] == 2:  # smallNORB stereo: show the pair side by side
        return np.concatenate([scaled[0], scaled[1]], axis=1)
    return scaled.transpose(1, 2, 0)
