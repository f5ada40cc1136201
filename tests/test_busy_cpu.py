"""launch/measure_cpu.py (capsdist/busy_cpu.py) runs end to end with tiny models and writes every figure."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_measure_cpu_tiny_writes_every_figure(tmp_path):
    out = tmp_path / "cpu.json"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    done = subprocess.run(
        [
            sys.executable,
            "launch/measure_cpu.py",
            "--tiny",
            "--out",
            str(out),
            "--policies",
            "PASSIVE",
            "--workers",
            "0",
            "auto",
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(out.read_text())
    bench = result["bench"]["PASSIVE"]
    assert bench["alone"]["train_images_per_s"] > 0 and len(bench["side_by_side"]) == 2
    assert bench["beside_training"]["train_images_per_s"] > 0
    assert bench["side_by_side_slowdown"] > 0 and bench["beside_training_slowdown"] > 0
    assert set(result["trainer"]) == {"0", "auto"}
    assert all(r["images_per_s"] > 0 and len(r["windows"]) == 3 for r in result["trainer"].values())
    assert result["bench_same_shape"]["input"] == [1, 28, 28]
