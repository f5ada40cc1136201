"""Every fused routing kernel compiles for the GPU, on the CPU: each launch the layers make (with and without
coordinates and E-step terms, the backward of moments and of lse) at fused_votes.GPU_BLOCKS' tiles and warps,
for sm_80 and sm_90, by Triton's compiler and ptxas (tests/gpu/kernels.py), with no register spill and at most
255 registers. Run in a subprocess: the suite runs Triton's interpreter (tests/conftest.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton.backends.nvidia")
pytestmark = pytest.mark.e2e  # a Python process without the interpreter: the GPU compiler

ROOT = Path(__file__).resolve().parents[1]


def test_every_fused_kernel_compiles_for_sm80_and_sm90_without_spills():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run(
        [sys.executable, "tests/gpu/kernels.py", "--json"], cwd=ROOT, env=env, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr[-3000:]
    records = [json.loads(line) for line in done.stdout.splitlines()]
    seen = {(r["kernel"], r["HAS_C"], r.get("HAS_E"), r.get("LSE"), r["arch"]) for r in records}
    for arch in ("sm_80", "sm_90"):
        for has_c in (False, True):  # every specialisation the layers launch was compiled
            assert {("moments", has_c, e, None, arch) for e in (False, True)} <= seen
            assert ("lse", has_c, None, None, arch) in seen
            assert {
                ("backward", has_c, e, lse, arch) for e, lse in ((False, False), (True, False), (True, True))
            } <= seen
    too_big = [r for r in records if r["spill_bytes"] > 0 or r["registers"] > 255]
    assert not too_big, "\n".join(map(json.dumps, too_big))
