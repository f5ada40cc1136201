"""Exact resume: kill -9 mid-epoch, incomplete checkpoints, another world size, SIGTERM."""

import os
import shutil
import signal

import pytest
import torch

from capsdist.train import checkpoint
from train_helpers import (
    BATCH,
    STEPS_PER_EPOCH,
    kill_group,
    losses,
    metrics,
    run,
    start,
    train_command,
    train_state,
    wait_for_step,
    weights,
)

pytestmark = pytest.mark.e2e  # every test here starts Python processes

TOTAL = STEPS_PER_EPOCH + 12  # crosses an epoch boundary after the resume


# the paper's stem, and a stem with BatchNorm, whose running statistics are state outside the optimiser
@pytest.mark.parametrize("model_keys", [(), ("--set", "model.stem_convs=1", "model.stem_norm=true")])
def test_kill9_then_resume_matches_uninterrupted(tiny_config, tmp_path, model_keys):
    reference = tmp_path / "reference"
    done = run(train_command(tiny_config, "--run-dir", str(reference), "--max-steps", str(TOTAL), *model_keys))
    assert done.returncode == 0, done.stderr[-3000:]

    crashed = tmp_path / "crashed"
    cmd = train_command(
        tiny_config, "--run-dir", str(crashed), "--max-steps", str(TOTAL), "--checkpoint-every", "3", *model_keys
    )
    proc = start(cmd, tmp_path / "crashed.log")
    seen = wait_for_step(proc, crashed, 8)
    kill_group(proc)  # SIGKILL: no handler runs, no checkpoint on the way out
    assert seen < TOTAL
    saved = checkpoint.step_checkpoints(crashed)[-1]
    assert 0 < train_state(saved)["step"] < STEPS_PER_EPOCH  # resumes mid-epoch

    resumed = run(
        train_command(
            tiny_config,
            "--run-dir",
            str(crashed),
            "--max-steps",
            str(TOTAL),
            "--checkpoint-every",
            "3",
            "--resume",
            "auto",
            *model_keys,
        )
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    expected, got = losses(reference), losses(crashed)
    assert sorted(got) == sorted(expected) == list(range(1, TOTAL + 1))
    assert got == expected  # bit-identical per-step losses, including the steps redone after the crash
    final = f"step-{TOTAL:07d}"
    a, b = weights(reference / "checkpoints" / final), weights(crashed / "checkpoints" / final)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert any(k.endswith("running_mean") for k in a) == bool(model_keys)


def test_incomplete_checkpoint_is_ignored(tiny_config, tmp_path):
    run_dir = tmp_path / "run"
    done = run(train_command(tiny_config, "--max-steps", "6", "--checkpoint-every", "3"))
    assert done.returncode == 0, done.stderr[-3000:]
    good = checkpoint.step_checkpoints(run_dir)[-1]
    assert good.name == "step-0000006"
    # a writer killed while saving leaves the temporary directory; a step directory cut short lacks files
    shutil.copytree(good, good.parent / ".tmp-step-0000009")
    cut = good.parent / "step-0000012"
    shutil.copytree(good, cut)
    (cut / "optimizer.bin").unlink()
    assert checkpoint.latest(run_dir) == good

    resumed = run(train_command(tiny_config, "--max-steps", "8", "--resume", "auto"))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    start_event = [m for m in metrics(run_dir) if "event/start" in m][-1]
    assert start_event["step"] == 6
    assert train_state(run_dir / "checkpoints" / "step-0000008")["step"] == 8


def test_resume_on_another_world_size_keeps_the_global_sample_count(tiny_config, tmp_path):
    run_dir = tmp_path / "run"
    first = run(train_command(tiny_config, "--max-steps", "10", procs=2))
    assert first.returncode == 0, first.stderr[-3000:]
    assert train_state(run_dir / "checkpoints" / "step-0000010")["world_size"] == 2

    second = run(train_command(tiny_config, "--max-steps", "24", "--resume", "auto"))
    assert second.returncode == 0, second.stderr[-3000:]
    assert "resuming a 2-process checkpoint on 1 processes" in second.stderr
    state = train_state(run_dir / "checkpoints" / "step-0000024")
    assert state["samples_seen"] == 24 * BATCH and state["world_size"] == 1
    assert (state["epoch"], state["batch_in_epoch"]) == (1, 24 - STEPS_PER_EPOCH)
    starts = [m for m in metrics(run_dir) if "event/start" in m]
    assert [(m["step"], m["world_size"], m["per_rank_batch"]) for m in starts] == [(0, 2, 8), (10, 1, 16)]
    assert sorted(losses(run_dir)) == list(range(1, 25))


@pytest.mark.parametrize("workers", [0, 2])
def test_sigterm_checkpoints_and_exits_cleanly(tiny_config, tmp_path, workers):
    """SIGTERM to the whole process group, loader workers included, as scancel or SLURM's --signal send it."""
    run_dir = tmp_path / "run"
    cmd = train_command(
        tiny_config, "--max-steps", "100000", "--checkpoint-every", "0", "--set", f"data.num_workers={workers}"
    )
    proc = start(cmd, tmp_path / "term.log")
    wait_for_step(proc, run_dir, 4)
    os.killpg(proc.pid, signal.SIGTERM)
    assert proc.wait(timeout=120) == 0, (tmp_path / "term.log").read_text()[-3000:]
    log = (tmp_path / "term.log").read_text()
    assert "stopped by SIGTERM" in log and "--resume auto" in log
    last = max(losses(run_dir))
    saved = checkpoint.step_checkpoints(run_dir)[-1]
    assert saved.name == f"step-{last:07d}" and train_state(saved)["step"] == last
