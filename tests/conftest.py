"""Shared pytest fixtures: one torch thread, the tiny shards and run config of the trainer tests, a routing recorder.
Where there is no CUDA device, Triton's interpreter (set before capsdist imports Triton): the fused routing
kernels' tests then run on the CPU, on small shapes."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from backends import needs_c_compiler, needs_triton
from train_helpers import TEST, TRAIN, write_tiny_config

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(autouse=True)
def python_processes_only_in_e2e(request, monkeypatch):
    """A test that starts a Python process pays its start-up (torch, Accelerate) in seconds: such a test must be
    marked e2e, so that the quick command stays quick. The marked ones may start what they like."""
    if request.node.get_closest_marker("e2e"):
        return
    real_init = subprocess.Popen.__init__

    def guarded_init(self, args, *rest, **kwargs):
        argv = [args] if isinstance(args, (str, bytes, os.PathLike)) else list(args)
        if argv and os.path.realpath(os.fsdecode(argv[0])) == os.path.realpath(sys.executable):
            raise AssertionError(f"{request.node.nodeid} starts a Python process: mark it @pytest.mark.e2e")
        real_init(self, args, *rest, **kwargs)

    monkeypatch.setattr(subprocess.Popen, "__init__", guarded_init)


@pytest.fixture(autouse=True)
def wandb_as_configured(monkeypatch):
    """In-process runs log to W&B as their config says: a WANDB_MODE in the environment (.ci/run sets offline)
    would win over it, as it does for users. Subprocess runs drop every WANDB_ variable (train_helpers.run_env)."""
    monkeypatch.delenv("WANDB_MODE", raising=False)


@pytest.fixture
def fresh_accelerator():
    """Accelerate keeps one state per process, mixed precision included: each test starts and ends without one."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)


@pytest.fixture
def one_torch_thread():
    """One intra-op thread for in-process model tests: their shapes are tiny, and on a busy 2-core machine two
    OpenMP threads spin against other processes and slow the test several-fold."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tiny_shards(tmp_path_factory) -> Path:
    """320 train / 64 test Fashion-MNIST-format samples as shards, prepared from IDX files the test writes."""
    from fixtures import prepare_idx_shards

    return prepare_idx_shards(tmp_path_factory.mktemp("fm-tiny"), TRAIN, TEST, shard_size=100)


@pytest.fixture
def tiny_config(tiny_shards, tmp_path) -> Path:
    """A run config file for the tiny model on the tiny shards; the run dir is tmp_path/run."""
    return write_tiny_config(tmp_path / "tiny.yaml", tiny_shards, tmp_path / "run")


@pytest.fixture
def route_calls(monkeypatch) -> list[dict]:
    """Every call the capsule layers make to routing during the test, in order: {"votes", "a_in", "log_R0",
    "settings", "result"} (the votes backend, child activations, initial log assignments (N', I), RoutingSettings
    and RoutingResult of the call)."""
    import capsdist.model.layers as layers

    calls: list[dict] = []
    original = layers.route

    def recording_route(votes, a_in, beta_u, beta_a, log_R0, settings):
        result = original(votes, a_in, beta_u, beta_a, log_R0, settings)
        calls.append({"votes": votes, "a_in": a_in, "log_R0": log_R0, "settings": settings, "result": result})
        return result

    monkeypatch.setattr(layers, "route", recording_route)
    return calls


@pytest.fixture(
    params=[
        "torch",
        pytest.param("triton", marks=needs_triton),
        pytest.param("c", marks=needs_c_compiler),
    ]
)
def routing_impl(request) -> str:
    """Each votes backend in turn (model.routing_impl): materialised (torch), fused in Triton (on CUDA where there
    is one, else in Triton's interpreter) and fused in C (the CPU)."""
    return request.param
