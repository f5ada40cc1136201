"""Every launch script with --set takes it repeatedly, and all the overrides apply (train, evaluate, bench,
bench_data); importing capsdist changes nothing in the process."""

import json
import subprocess
import sys

import pytest
import yaml

from fixtures import launch_script
from train_helpers import REPO, TRAIN, run, run_env, train_command


@pytest.mark.e2e
def test_train_and_evaluate_take_repeated_set(tiny_config, tmp_path):
    trained = run(
        train_command(
            tiny_config,
            "--set",
            "optim.lr=1e-3",
            "--set",
            "train.max_steps=1",
            "eval.test=false",
            "--set",
            "checkpoint.keep_last=1",
        )
    )
    assert trained.returncode == 0, trained.stderr[-3000:]
    saved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert (
        saved["optim"]["lr"],
        saved["train"]["max_steps"],
        saved["eval"]["test"],
        saved["checkpoint"]["keep_last"],
    ) == (1e-3, 1, False, 1)
    evaluated = run(
        [
            sys.executable,
            str(REPO / "launch" / "evaluate.py"),
            "--run-dir",
            str(tmp_path / "run"),
            "--split",
            "val",
            "--set",
            "data.val_fraction=0.5",
            "--set",
            "eval.batch_size=8",
        ]
    )
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    result = json.loads((tmp_path / "run" / "eval-best-val.json").read_text())
    assert result["count"] == TRAIN // 2


def test_bench_and_bench_data_take_repeated_set(tiny_config, capsys, fresh_accelerator):
    assert (
        launch_script("bench_data").main(
            ["--config", str(tiny_config), "--set", "train.batch_size=8", "--set", "data.num_workers=0", "--steps", "2"]
        )
        == 0
    )
    out = json.loads(capsys.readouterr().out)
    assert (out["batch_size"], out["workers"]) == (8, 0)
    assert (
        launch_script("bench").main(
            [
                "--config",
                str(tiny_config),
                "--steps",
                "1",
                "--warmup",
                "0",
                "--device",
                "cpu",
                "--set",
                "train.batch_size=2",
                "model.iterations=2",
                "--set",
                "train.mixed_precision=bf16",
            ]
        )
        == 0
    )
    out = json.loads(capsys.readouterr().out)
    assert (out["batch_size"], out["routing_iterations"], out["mixed_precision"]) == (2, 2, "bf16")


@pytest.mark.e2e
def test_importing_capsdist_changes_nothing_in_the_process():
    """No environment variable and no logging handler comes from importing the package and its modules: the
    launch scripts set those up (capsdist.core.cli.setup_process)."""
    probe = (
        "import logging, os\n"
        "before, handlers = dict(os.environ), list(logging.getLogger().handlers)\n"
        "import capsdist, capsdist.config, capsdist.train.build, capsdist.train.benchmark, capsdist.train.trainer\n"
        "import capsdist.experiments.evaluate\n"
        "changed = sorted(k for k in set(os.environ) | set(before) if os.environ.get(k) != before.get(k))\n"
        "assert not changed, changed\n"
        "assert logging.getLogger().handlers == handlers, logging.getLogger().handlers\n"
    )
    env = {k: v for k, v in run_env().items() if k != "THP_MEM_ALLOC_ENABLE"}
    result = subprocess.run(
        [sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, env=env, timeout=240
    )
    assert result.returncode == 0, result.stderr
