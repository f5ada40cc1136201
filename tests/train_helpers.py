"""Helpers of the trainer tests: the tiny run config, launching runs, reading their metrics and checkpoints.

The fixtures `tiny_shards` and `tiny_config` (conftest.py) build on TINY. The tiny model (A=8, B=C=D=4, one routing
iteration) on 320 + 64 Fashion-MNIST-format images makes a training step take a few milliseconds, so the tests
measure the trainer, not the network. The images are written by the tests themselves (IDX files, then shards), so
nothing outside the repository is needed.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TRAIN, TEST, BATCH = 320, 64, 16  # tiny split sizes; val = 10% of TRAIN; global batch
STEPS_PER_EPOCH = (TRAIN - TRAIN // 10) // BATCH  # 18

TINY = {
    "model": {"size": "small", "A": 8, "B": 4, "C": 4, "D": 4, "iterations": 1},
    "data": {"dataset": "fashion-mnist", "prepare": "never", "val_fraction": 0.1, "num_workers": 0},
    "optim": {"lr": 3e-3, "lr_decay_images": 100 * BATCH},
    "loss": {"max_margin_images": 50 * BATCH},
    "train": {"batch_size": BATCH, "epochs": 2},
    "eval": {"batch_size": 32, "misclassified_images": 2},
    "checkpoint": {"every_steps": 5, "keep_last": 2},
    "logging": {"every_steps": 4, "wandb": {"mode": "disabled"}},
}


def write_tiny_config(path: Path, shards: Path, run_dir: Path) -> Path:
    """TINY on `shards` with run directory `run_dir`, as the YAML file `path`."""
    import yaml

    cfg = json.loads(json.dumps(TINY))
    cfg["data"]["shards"], cfg["run_dir"] = str(shards), str(run_dir)
    path.write_text(yaml.safe_dump(cfg))
    return path


def faulty_loss(steps: set[int], fault=lambda loss: loss * math.nan):
    """A replacement for capsdist.train.trainer.make_loss whose loss goes through `fault` at the given (0-based)
    global steps (default: a NaN loss)."""
    from capsdist.train import trainer

    real = trainer.make_loss

    def make_loss(*args, **kwargs):
        loss_fn = real(*args, **kwargs)

        def patched(acts, labels, images_seen):
            loss, margin = loss_fn(acts, labels, images_seen)
            return (fault(loss) if images_seen // BATCH in steps else loss), margin

        return patched

    return make_loss


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def train_command(
    config: Path, *args: str, procs: int = 1, launch: tuple[str, ...] = (), script: Path = REPO / "launch" / "train.py"
) -> list[str]:
    """The command line of `script` (launch/train.py) on 1 process (python) or `procs` CPU processes
    (capsdist.train.launch, with the extra launcher arguments `launch`)."""
    script = [str(script), "--config", str(config), *args]
    if procs == 1:
        return [sys.executable, *script]
    return [
        sys.executable,
        "-m",
        "capsdist.train.launch",
        "--config_file",
        str(REPO / "configs" / "accelerate" / "cpu-2proc.yaml"),
        "--num_processes",
        str(procs),
        "--main_process_port",
        str(free_port()),
        *launch,
        *script,
    ]


def run(cmd: list[str], timeout: float = 240, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run to completion in the repository root, output captured as text; `env` adds to `run_env()`."""
    return subprocess.run(
        cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout, env={**run_env(), **(env or {})}
    )


def start(cmd: list[str], log: Path) -> subprocess.Popen:
    """Start in the background (own process group), stdout and stderr to `log`."""
    return subprocess.Popen(
        cmd, cwd=REPO, stdout=log.open("w"), stderr=subprocess.STDOUT, env=run_env(), start_new_session=True
    )


def run_env() -> dict:
    """The runs' environment: unbuffered, one thread per process, and no W&B credentials (hermetic)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    return {**env, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", "NETRC": os.devnull}


def metrics(run_dir: Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def last_step(run_dir: Path) -> int:
    return max((m["step"] for m in metrics(run_dir) if "train/loss" in m), default=0)


def losses(run_dir: Path) -> dict[int, float]:
    """Training loss per global step; a step redone after a resume keeps its last value."""
    return {m["step"]: m["train/loss"] for m in metrics(run_dir) if "train/loss" in m}


def wait_for_step(proc: subprocess.Popen, run_dir: Path, step: int, timeout: float = 180) -> int:
    """Poll metrics.jsonl until the run has logged `step` (returns the step seen); fails if it exits."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        seen = last_step(run_dir)
        if seen >= step:
            return seen
        assert proc.poll() is None, f"run exited with {proc.returncode} before step {step}"
        time.sleep(0.01)
    raise AssertionError(f"run did not reach step {step} in {timeout}s")


def act_at_step(proc: subprocess.Popen, run_dir: Path, step: int, act, timeout: float = 120) -> int:
    """Once the run has logged `step`, call `act()` (a signal to some process of it), then wait for the run to
    exit: its status. A run still alive after `timeout` is killed with its group (and the wait fails)."""
    try:
        wait_for_step(proc, run_dir, step)
        act()
        return proc.wait(timeout=timeout)
    finally:
        if proc.poll() is None:
            kill_group(proc)


def kill_group(proc: subprocess.Popen, sig: int = signal.SIGKILL) -> None:
    os.killpg(proc.pid, sig)
    proc.wait(timeout=60)


def rank_pid(launcher: int, rank: int) -> int:
    """The pid of training process `rank` started (directly or not) by `launcher`."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            environ = (entry / "environ").read_bytes().split(b"\0")
            parents = _ancestors(int(entry.name))
        except OSError:
            continue
        if (
            launcher in parents
            and f"RANK={rank}".encode() in environ
            and b"LOCAL_RANK=" + str(rank).encode() in environ
        ):
            return int(entry.name)
    raise AssertionError(f"no rank {rank} under {launcher}")


def _ancestors(pid: int) -> list[int]:
    chain = []
    while pid > 1:
        stat = Path(f"/proc/{pid}/stat").read_text()
        pid = int(stat.rsplit(")", 1)[1].split()[1])
        chain.append(pid)
    return chain


def weights(checkpoint: Path) -> dict:
    from capsdist.train.checkpoint import read_checkpoint

    return read_checkpoint(Path(checkpoint))[0]


def train_state(checkpoint: Path) -> dict:
    from capsdist.train.checkpoint import read_state

    return dataclasses.asdict(read_state(Path(checkpoint)))
