"""Processes that stop: a hung rank ends the run after train.collective_timeout_s; SIGTERM to the launcher alone
checkpoints and exits 0."""

import os
import signal
import time

import pytest

from capsdist.train import checkpoint
from train_helpers import act_at_step, kill_group, losses, rank_pid, start, train_command, train_state, wait_for_step

pytestmark = pytest.mark.e2e  # every test here starts Python processes


def test_a_hung_rank_stops_the_run_after_the_timeout(tiny_config, tmp_path):
    run_dir = tmp_path / "run"
    cmd = train_command(
        tiny_config,
        "--max-steps",
        "100000",
        "--checkpoint-every",
        "2",
        "--set",
        "train.collective_timeout_s=10",
        procs=2,
    )
    proc = start(cmd, tmp_path / "hung.log")
    try:
        wait_for_step(proc, run_dir, 4)
        os.kill(rank_pid(proc.pid, 1), signal.SIGSTOP)  # alive but silent, as on a dead NFS mount
        stopped = time.monotonic()
        code = proc.wait(timeout=150)
        waited = time.monotonic() - stopped
    finally:
        if proc.poll() is None:
            kill_group(proc)
    log = (tmp_path / "hung.log").read_text()
    assert code != 0 and waited < 100, log[-3000:]
    assert "no answer from another process within train.collective_timeout_s=10" in log, log[-3000:]
    assert all(checkpoint.verify(path) is None for path in (run_dir / "checkpoints").glob("step-*"))
    assert train_state(checkpoint.latest(run_dir))["step"] >= 2  # resumable


def test_sigterm_to_the_launcher_alone_checkpoints_and_exits_0(tiny_config, tmp_path):
    run_dir = tmp_path / "run"
    proc = start(
        train_command(tiny_config, "--max-steps", "100000", "--checkpoint-every", "0", procs=2), tmp_path / "term.log"
    )
    code = act_at_step(proc, run_dir, 4, lambda: proc.send_signal(signal.SIGTERM))  # the launcher only (kill PID)
    log = (tmp_path / "term.log").read_text()
    assert code == 0, log[-3000:]
    assert "stopped by SIGTERM" in log and "Traceback" not in log
    last = max(losses(run_dir))
    assert train_state(checkpoint.latest(run_dir))["step"] == last
