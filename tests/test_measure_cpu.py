"""launch/measure_cpu.py runs end to end with tiny models and writes every figure."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import yaml

from capsdist.core.cli import SPIN_COUNT
from fixtures import launch_script
from train_helpers import REPO


@pytest.mark.e2e
def test_measure_cpu_tiny_writes_every_figure(tmp_path):
    out = tmp_path / "cpu.json"
    args = ["--tiny", "--out", str(out), "--policies", "default", "--workers", "0", "auto"]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    done = subprocess.run(
        [sys.executable, "launch/measure_cpu.py", *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(out.read_text())
    bench = result["bench"]["default"]
    assert bench["alone"]["train_images_per_s"] > 0 and len(bench["side_by_side"]) == 2
    assert bench["alone"]["omp_wait_policy"] == "unset"  # default: the environment without OMP_WAIT_POLICY
    assert bench["alone"]["gomp_spincount"] == SPIN_COUNT  # set by the bench's own setup, before torch loads
    assert bench["beside_training"]["train_images_per_s"] > 0
    assert bench["side_by_side_slowdown"] > 0 and bench["beside_training_slowdown"] > 0
    assert set(result["trainer"]) == {"0", "auto"}
    assert all(r["images_per_s"] > 0 and len(r["windows"]) == 3 for r in result["trainer"].values())
    assert result["bench_same_shape"]["input"] == [1, 28, 28]


def _option(args: list[str], name: str) -> str | None:
    return args[args.index(name) + 1] if name in args else None


@pytest.mark.parametrize("tiny", [False, True])
def test_the_same_shape_bench_runs_the_training_runs_batch(tiny):
    """The trainer is compared with launch/bench.py on its own model, shape and batch size."""
    plan = launch_script("measure_cpu").plan_for(tiny)
    config = yaml.safe_load((REPO / plan.train_config).read_text())
    overrides = dict(kv.split("=", 1) for kv in plan.train_overrides)
    train_batch = int(overrides.get("train.batch_size", config["train"]["batch_size"]))
    bench_config = yaml.safe_load((REPO / _option(plan.bench_same_shape, "--config")).read_text())
    bench_batch = int(_option(plan.bench_same_shape, "--batch-size") or bench_config["train"]["batch_size"])
    assert bench_batch == train_batch
