"""One trainer per run directory: a second one stops at once naming the first (its pid and host), evaluation reads
beside it, and a trainer killed with -9 leaves no stale lock."""

import errno
import multiprocessing
import os
import signal
import socket
import sys
import time

import pytest

from capsdist.train.lock import RunLock
from train_helpers import REPO, kill_group, last_step, metrics, run, start, train_command, train_state, wait_for_step


@pytest.mark.e2e
def test_a_second_trainer_on_the_run_directory_stops_at_once(tiny_config, tmp_path):
    run_dir = tmp_path / "run"
    first = start(train_command(tiny_config, "--max-steps", "100000", "--checkpoint-every", "2"), tmp_path / "a.log")
    try:
        wait_for_step(first, run_dir, 4)
        os.kill(first.pid, signal.SIGSTOP)  # alive and holding the lock, but writing nothing while we look
        config_before = (run_dir / "config.yaml").read_text()
        metrics_before = (run_dir / "metrics.jsonl").read_text()

        second = run(train_command(tiny_config, "--max-steps", "4", "--set", "optim.lr=1e-2", procs=2))
        assert second.returncode != 0
        holder = f"pid {first.pid} on host {socket.gethostname()}"
        # both ranks stop with the message, neither waits for a collective to time out
        assert second.stderr.count(f"{run_dir} is in use by another trainer ({holder}") == 2, second.stderr[-3000:]
        assert (run_dir / "config.yaml").read_text() == config_before
        assert (run_dir / "metrics.jsonl").read_text() == metrics_before
        assert [m["step"] for m in metrics(run_dir) if "event/start" in m] == [0]

        evaluate = REPO / "launch" / "evaluate.py"
        evaluated = run(
            [sys.executable, str(evaluate), "--run-dir", str(run_dir), "--checkpoint", "latest", "--split", "val"]
        )
        assert evaluated.returncode == 0, evaluated.stderr[-3000:]
        assert "val accuracy" in evaluated.stdout
    finally:
        os.kill(first.pid, signal.SIGCONT)
        kill_group(first)  # SIGKILL: no handler runs, the kernel drops the lock with the process

    seen = last_step(run_dir)
    resumed = run(train_command(tiny_config, "--max-steps", str(seen + 2)))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert train_state(run_dir / "checkpoints" / f"step-{seen + 2:07d}")["step"] == seen + 2


def test_a_forked_child_does_not_keep_the_lock(tmp_path):
    """Loader workers are forked from the trainer: the lock must die with the trainer, not with its last worker."""
    lock = RunLock(tmp_path)
    assert lock.acquire() is None
    fork = multiprocessing.get_context("fork")
    running = fork.Event()
    child = fork.Process(target=_wait, args=(running,))
    child.start()
    try:
        assert running.wait(30)
        lock.release()
        again = RunLock(tmp_path)
        assert again.acquire() is None
        again.release()
    finally:
        child.kill()
        child.join()


def _wait(running) -> None:
    running.set()
    time.sleep(60)


def test_a_held_lock_names_its_holder_and_a_filesystem_without_locks_is_a_warning(tmp_path, monkeypatch, caplog):
    first, second = RunLock(tmp_path), RunLock(tmp_path)
    assert first.acquire() is None
    assert second.acquire().startswith(f"pid {os.getpid()} on host {socket.gethostname()} since ")
    first.release()

    def no_locks(fd, operation):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr("capsdist.train.lock.fcntl.flock", no_locks)
    assert second.acquire() is None
    assert "cannot lock" in caplog.text and "No locks available" in caplog.text
    second.release()
