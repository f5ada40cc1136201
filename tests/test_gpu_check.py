"""tests/gpu/check.sh, the prepared GPU check, runs end to end in its CPU mode (CHECK_TINY=1: tiny models,
Triton's interpreter) and writes every JSON it promises."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e  # every test here starts Python processes

ROOT = Path(__file__).resolve().parents[1]
FIGURES = ["env", "tests-equivalence", "tests-cuda"] + [
    f"bench-{preset}-{impl}" for preset in ("full", "small") for impl in ("torch", "triton")
]


def test_gpu_check_script_cpu_mode(tmp_path):
    env = dict(os.environ, CHECK_TINY="1", OUT=str(tmp_path), PYTHON=sys.executable)
    done = subprocess.run(
        ["bash", "tests/gpu/check.sh"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900
    )
    assert done.returncode == 0, done.stderr[-3000:]
    figures = {name: json.loads((tmp_path / f"{name}.json").read_text()) for name in FIGURES}
    assert all("error" not in figure for figure in figures.values()), figures
    assert figures["tests-equivalence"]["passed"] == 1 and figures["tests-equivalence"]["failures"] == 0
    assert figures["tests-cuda"]["failures"] == figures["tests-cuda"]["errors"] == 0
    for preset in ("full", "small"):
        for impl in ("torch", "triton"):
            bench = figures[f"bench-{preset}-{impl}"]
            assert bench["routing"] == impl and bench["batch_size"] == 2 and bench["input"] == [1, 32, 32]
