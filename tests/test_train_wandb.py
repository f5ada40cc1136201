"""W&B offline: the run's own files read back with the expected keys and steps; a resume continues the same run id;
WANDB_MODE in the environment wins over the config; an unreachable W&B server means logging offline, not a failed run."""

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from capsdist.config import load_config
from capsdist.train.tracking import wandb_settings
from train_helpers import free_port, run, train_command

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


@pytest.mark.parametrize("env_mode, expected", [("offline", "offline"), ("disabled", None)])
def test_wandb_mode_in_the_environment_wins(tiny_config, tmp_path, monkeypatch, env_mode, expected):
    monkeypatch.setenv("WANDB_API_KEY", "0" * 40)  # credentials: the config's online would stay online
    monkeypatch.setenv("WANDB_MODE", env_mode)
    monkeypatch.delenv("WANDB_SILENT", raising=False)
    cfg = load_config(tiny_config, ["logging.wandb.mode=online"])
    settings = wandb_settings(cfg, tmp_path, is_main=True)
    assert (settings and settings["mode"]) == expected
    assert os.environ["WANDB_MODE"] == env_mode


def test_online_without_a_network_falls_back_to_offline(tiny_config, tmp_path):
    """A W&B server that cannot be reached (a closed local port) costs init_timeout_s, then the run logs offline;
    the printed sync command is shell-quoted (the run directory holds a space and a quote)."""
    run_dir = tmp_path / "it's a run"
    result = run(
        train_command(
            tiny_config,
            "--run-dir",
            str(run_dir),
            "--max-steps",
            "2",
            "--set",
            "logging.wandb.mode=online",
            "logging.wandb.init_timeout_s=3",
        ),
        timeout=150,
        env={"WANDB_API_KEY": "0" * 40, "WANDB_BASE_URL": f"http://127.0.0.1:{free_port()}"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "W&B cannot be reached" in result.stdout and "logging offline" in result.stdout
    run_id = (run_dir / "wandb_id.txt").read_text().strip()
    (folder,) = (run_dir / "wandb").glob(f"offline-run-*-{run_id}")
    (sync,) = re.findall(r"upload it with: (.*)$", result.stdout, re.MULTILINE)
    assert shlex.split(sync) == ["wandb", "sync", str(folder)]
    assert sorted({r["_step"] for r in history(folder) if "train/loss" in r}) == [1, 2]
