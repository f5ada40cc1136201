"""Two "nodes" on this machine (torchrun --nnodes 2, c10d rendezvous on localhost, gloo) train, checkpoint, and
resume on one node with 2 processes exactly as an uninterrupted single-node run."""

import subprocess
import sys

import torch

import pytest

from train_helpers import REPO, free_port, losses, run, run_env, train_command, weights

pytestmark = pytest.mark.e2e  # every test here starts Python processes


def test_two_nodes_then_one_node_match_one_node(tiny_config, tmp_path):
    reference = run(train_command(tiny_config, "--run-dir", str(tmp_path / "ref"), "--max-steps", "6", procs=2))
    assert reference.returncode == 0, reference.stderr[-3000:]

    port, run_dir = free_port(), tmp_path / "nodes"
    nodes = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "torch.distributed.run",
                "--nnodes",
                "2",
                "--nproc-per-node",
                "1",
                "--node-rank",
                str(rank),
                "--rdzv-backend",
                "c10d",
                "--rdzv-id",
                "capsdist-test",
                "--rdzv-endpoint",
                f"127.0.0.1:{port}",
                str(REPO / "launch" / "train.py"),
                "--config",
                str(tiny_config),
                "--run-dir",
                str(run_dir),
                "--max-steps",
                "4",
            ],
            cwd=REPO,
            env=run_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for rank in (0, 1)
    ]
    outputs = [node.communicate(timeout=240)[0] for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], "\n".join(o[-2000:] for o in outputs)
    assert any("done at step 4 (2 processes)" in o for o in outputs)

    resumed = run(train_command(tiny_config, "--run-dir", str(run_dir), "--max-steps", "6", procs=2))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert losses(run_dir) == losses(tmp_path / "ref") and sorted(losses(run_dir)) == list(range(1, 7))
    a, b = weights(run_dir / "checkpoints" / "step-0000006"), weights(tmp_path / "ref" / "checkpoints" / "step-0000006")
    assert all(torch.equal(a[k], b[k]) for k in a)
