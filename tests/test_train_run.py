"""End to end: a 2-process CPU run trains, evaluates, checkpoints and exits 0; evaluate.py agrees on 1 and 2
processes."""

import json
import sys

import pytest

from train_helpers import REPO, STEPS_PER_EPOCH, TEST, TRAIN, free_port, metrics, run, train_command, train_state

pytestmark = pytest.mark.e2e  # every test here starts Python processes


def test_two_process_run_and_evaluate(tiny_config, tmp_path):
    run_dir = tmp_path / "run"
    result = run(train_command(tiny_config, "--max-steps", str(STEPS_PER_EPOCH + 4), procs=2))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "done at step 22 (2 processes)" in result.stdout

    records = metrics(run_dir)
    start = next(m for m in records if "event/start" in m)
    assert start["world_size"] == 2 and start["per_rank_batch"] == 8
    steps = [m["step"] for m in records if "train/loss" in m]
    assert steps == list(range(1, STEPS_PER_EPOCH + 5))
    evals = [m for m in records if "val/accuracy" in m]
    assert [m["step"] for m in evals] == [STEPS_PER_EPOCH, STEPS_PER_EPOCH + 4]  # epoch end, end of run
    assert all(m["val/count"] == TRAIN // 10 for m in evals)  # every validation sample counted once
    assert all(m["test/count"] == TEST for m in records if "test/count" in m)
    logged = [m for m in records if "perf/images_per_s" in m]  # the log steps
    assert logged and all(
        "health/classcaps/assignment_entropy" in m
        and "health/classcaps/dead_fraction" in m
        and "health/primarycaps/mean_activation" in m
        and m["grad_norm/total"] > 0
        for m in logged
    )

    checkpoints = run_dir / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["best", "step-0000020", "step-0000022"]  # keep_last 2
    final = checkpoints / "step-0000022"
    assert {"random_states_0.pkl", "random_states_1.pkl", "model.safetensors", "optimizer.bin"} <= {
        p.name for p in final.iterdir()
    }
    state = train_state(final)
    assert (state["step"], state["epoch"], state["batch_in_epoch"]) == (22, 1, 4)
    assert state["world_size"] == 2 and state["samples_seen"] == 22 * 16

    # evaluate.py: one process and two processes give the same numbers
    single = run(
        [sys.executable, str(REPO / "launch" / "evaluate.py"), "--run-dir", str(run_dir), "--checkpoint", "latest"]
    )
    assert single.returncode == 0, single.stderr[-3000:]
    assert "test accuracy" in single.stdout and "confusion matrix" in single.stdout
    written = run_dir / "eval-step-0000022-test.json"
    one = json.loads(written.read_text())
    written.unlink()
    double = run(
        [
            sys.executable,
            "-m",
            "accelerate.commands.launch",
            "--config_file",
            str(REPO / "configs" / "accelerate" / "cpu-2proc.yaml"),
            "--main_process_port",
            str(free_port()),
            str(REPO / "launch" / "evaluate.py"),
            "--run-dir",
            str(run_dir),
            "--checkpoint",
            "latest",
        ]
    )
    assert double.returncode == 0, double.stderr[-3000:]
    two = json.loads(written.read_text())
    assert one["count"] == two["count"] == TEST
    for key in ("accuracy", "per_class_accuracy", "confusion"):
        assert one[key] == two[key]
    assert abs(one["loss"] - two["loss"]) < 1e-6
    final_test = [m["test/accuracy"] for m in records if "test/accuracy" in m][-1]
    assert one["accuracy"] == final_test
