"""Multi-process restarts on 2 CPU processes (gloo): every rank resumes the checkpoint rank 0 chose, whatever its
own view of the run directory, or all stop before anything is changed; torchrun's elastic agent restarts a group
that lost a rank to kill -9, and the run continues from its newest checkpoint exactly as if uninterrupted."""

import os
import signal
from pathlib import Path

import pytest

from capsdist.train import checkpoint
from train_helpers import (
    REPO,
    STEPS_PER_EPOCH,
    act_at_step,
    losses,
    metrics,
    rank_pid,
    run,
    start,
    train_command,
    write_tiny_config,
)

TOTAL = 2 * STEPS_PER_EPOCH  # the tiny config's 2 epochs
STALE_VIEW = REPO / "tests" / "stale_view.py"


pytestmark = pytest.mark.e2e  # every test here starts Python processes


@pytest.fixture(scope="module")
def config(tiny_shards, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("restart")
    return write_tiny_config(root / "tiny.yaml", tiny_shards, root / "run")


@pytest.fixture(scope="module")
def reference(config) -> dict[int, float]:
    """Per-step losses of an uninterrupted 2-process run of TOTAL steps."""
    done = run(train_command(config, "--run-dir", str(config.parent / "reference"), "--max-steps", str(TOTAL), procs=2))
    assert done.returncode == 0, done.stderr[-3000:]
    return losses(config.parent / "reference")


def _six_steps(config: Path, run_dir: Path) -> None:
    """2 processes to step 6, checkpoints step-4 and step-6 kept."""
    done = run(train_command(config, "--run-dir", str(run_dir), "--max-steps", "6", "--checkpoint-every", "2", procs=2))
    assert done.returncode == 0, done.stderr[-3000:]
    assert [p.name for p in checkpoint.step_checkpoints(run_dir)] == ["step-0000004", "step-0000006"]


def test_every_rank_resumes_what_rank_0_chose(config, reference, tmp_path):
    """Rank 1 does not list step-6 (a stale directory listing) but can read it: it resumes there with rank 0."""
    run_dir = tmp_path / "stale"
    _six_steps(config, run_dir)
    resumed = run(
        train_command(
            config,
            "--run-dir",
            str(run_dir),
            "--max-steps",
            str(TOTAL),
            "--set",
            "train.collective_timeout_s=30",
            procs=2,
            script=STALE_VIEW,
        ),
        env={"STALE_VIEW_HIDE": "step-0000006"},
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert [m["step"] for m in metrics(run_dir) if "event/start" in m] == [0, 6]
    assert losses(run_dir) == reference
    assert checkpoint.verify(run_dir / "checkpoints" / f"step-{TOTAL:07d}") is None  # every rank's RNG state in it


def test_a_rank_that_cannot_read_the_choice_stops_every_rank_before_anything_changes(config, tmp_path):
    run_dir = tmp_path / "gone"
    _six_steps(config, run_dir)
    before = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    resumed = run(
        train_command(config, "--run-dir", str(run_dir), "--max-steps", str(TOTAL), procs=2, script=STALE_VIEW),
        env={"STALE_VIEW_HIDE": "step-0000006", "STALE_VIEW_GONE": "1"},
    )
    assert resumed.returncode != 0
    chosen = run_dir / "checkpoints" / "step-0000006"
    message = f"{chosen}: rank 0 chose it to resume from, but rank 1 cannot use it (not a directory)"
    assert resumed.stderr.count(message) == 2, resumed.stderr[-3000:]  # both ranks, at once
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == before  # nothing pruned or moved
    assert [m["step"] for m in metrics(run_dir) if "event/start" in m] == [0]


def test_the_elastic_agent_restarts_a_group_that_lost_a_rank(config, reference, tmp_path):
    """kill -9 of rank 1 under `python -m capsdist.train.launch --max_restarts 1`: the agent ends rank 0, starts both
    again, and --resume auto continues from the newest checkpoint; the losses are those of an uninterrupted run."""
    run_dir = tmp_path / "elastic"
    cmd = train_command(
        config,
        "--run-dir",
        str(run_dir),
        "--max-steps",
        str(TOTAL),
        "--checkpoint-every",
        "2",
        procs=2,
        launch=("--max_restarts", "1"),
    )
    proc = start(cmd, tmp_path / "elastic.log")
    code = act_at_step(proc, run_dir, 6, lambda: os.kill(rank_pid(proc.pid, 1), signal.SIGKILL), timeout=300)
    log = (tmp_path / "elastic.log").read_text()
    assert code == 0, log[-3000:]
    starts = [m["step"] for m in metrics(run_dir) if "event/start" in m]
    assert len(starts) == 2 and starts[0] == 0 and 0 < starts[1] < TOTAL and starts[1] % 2 == 0, starts
    assert losses(run_dir) == reference
