"""W&B offline: the run's own files read back with the expected keys and steps; a resume continues the same run id."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from train_helpers import run, train_command

pytestmark = pytest.mark.e2e  # every test here starts Python processes

WANDB = Path(sys.executable).with_name("wandb")


def history(run_folder: Path) -> list[dict]:
    """The history rows of an offline run folder, read with wandb's own record reader."""
    (log,) = run_folder.glob("run-*.wandb")
    out = subprocess.run(
        [str(WANDB), "leet", "inspect", "--json", str(log)], capture_output=True, text=True, check=True, timeout=120
    ).stdout
    records = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    return [r["history"]["item"] for r in records if r["type"] == "history"]


def test_offline_run_files_and_resume(tiny_config, tmp_path):
    run_dir = tmp_path / "run"
    first = run(
        train_command(
            tiny_config,
            "--max-steps",
            "6",
            "--set",
            "logging.wandb.mode=online",
            "logging.every_steps=2",
            "eval.every_steps=6",
        )
    )
    assert first.returncode == 0, first.stderr[-3000:]
    assert "no W&B credentials" in first.stdout and "wandb sync" in first.stdout
    run_id = (run_dir / "wandb_id.txt").read_text().strip()

    second = run(train_command(tiny_config, "--max-steps", "10", "--set", "logging.wandb.mode=offline"))
    assert second.returncode == 0, second.stderr[-3000:]
    assert (run_dir / "wandb_id.txt").read_text().strip() == run_id

    folders = sorted((run_dir / "wandb").glob(f"offline-run-*-{run_id}"))
    assert len(folders) == 2  # an offline resume opens a new folder of the same run id
    rows = history(folders[0])
    assert sorted({r["_step"] for r in rows if "train/loss" in r}) == list(range(1, 7))
    keys = set().union(*rows)
    expected = {
        "train/loss",
        "train/accuracy",
        "lr",
        "margin",
        "perf/images_per_s",
        "perf/images_per_s_per_process",
        "perf/step_time_s",
        "perf/peak_memory_mb",
        "val/accuracy",
        "val/loss",
        "test/accuracy",
        "test/loss",
        "health/convcaps1/mean_activation",
        "health/classcaps/assignment_entropy",
        "grad_norm/total",
    }
    assert expected <= keys
    assert any(k.startswith("val/confusion_matrix") for k in keys)
    assert any(k.startswith("val/misclassified") for k in keys)
    resumed = sorted({r["_step"] for r in history(folders[1]) if "train/loss" in r})
    assert resumed == list(range(7, 11))  # explicit global steps from the checkpoint, not a new count from 0
