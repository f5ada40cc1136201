"""CPU thread budget (capsdist.core.threads): auto loader workers, intra-op threads, the setting resolved once per
run."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from capsdist.core import threads
from capsdist.config import load_config
from capsdist.core.errors import ConfigError
from capsdist.train import trainer

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def no_thread_setting(monkeypatch):
    """The budget as on a machine where no OMP_NUM_THREADS is set (the tests' own is restored after)."""
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)


@pytest.mark.parametrize("cores,workers", [(1, 0), (2, 0), (3, 1), (4, 1), (8, 2), (16, 4), (64, 8)])
def test_auto_workers_from_cores(cores, workers):
    assert threads.auto_workers(cores) == workers
    plan = threads.budget("auto", cores=cores)
    assert plan == (cores, workers, max(1, cores - workers))


def test_explicit_workers_leave_the_training_process_the_rest_of_the_cores():
    assert threads.budget(2, cores=2) == (2, 2, 1)
    assert threads.budget(3, cores=16) == (16, 3, 13)


def test_an_explicit_omp_num_threads_wins(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert threads.budget("auto", cores=16) == (16, 4, 1)


def test_setup_process_sets_omp_wait_policy_only_when_unset(monkeypatch):
    from capsdist.core.cli import setup_process

    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    monkeypatch.setenv("THP_MEM_ALLOC_ENABLE", "1")
    setup_process()
    assert os.environ["OMP_WAIT_POLICY"] == "PASSIVE"
    monkeypatch.setenv("OMP_WAIT_POLICY", "ACTIVE")
    setup_process()
    assert os.environ["OMP_WAIT_POLICY"] == "ACTIVE"


def test_setup_process_for_training_spins_then_sleeps(monkeypatch):
    """The training scripts spin SPIN_COUNT iterations, then sleep (capsdist.core.cpu_share shares the cores);
    a user's spin count or wait policy wins, and a user's policy gets no spin count beside it."""
    from capsdist.core.cli import SPIN_COUNT, setup_process

    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    monkeypatch.delenv("GOMP_SPINCOUNT", raising=False)
    monkeypatch.setenv("THP_MEM_ALLOC_ENABLE", "1")
    setup_process(spin=True)
    assert "OMP_WAIT_POLICY" not in os.environ and os.environ["GOMP_SPINCOUNT"] == SPIN_COUNT
    monkeypatch.setenv("GOMP_SPINCOUNT", "1000")
    setup_process(spin=True)
    assert os.environ["GOMP_SPINCOUNT"] == "1000" and "OMP_WAIT_POLICY" not in os.environ
    monkeypatch.delenv("GOMP_SPINCOUNT")
    monkeypatch.setenv("OMP_WAIT_POLICY", "PASSIVE")
    setup_process(spin=True)
    assert os.environ["OMP_WAIT_POLICY"] == "PASSIVE" and "GOMP_SPINCOUNT" not in os.environ


@pytest.mark.parametrize(
    "script", ["train.py", "bench.py", "evaluate.py", "bench_data.py", "measure_cpu.py", "experiment.py"]
)
@pytest.mark.e2e
def test_launch_scripts_set_up_the_process_before_torch_loads(script):
    """Importing a launch script loads no torch, and no capsdist import changes the environment: setup_process
    (OMP_WAIT_POLICY) runs before OpenMP is loaded."""
    code = (
        "import importlib.util, os, sys; "
        f"spec = importlib.util.spec_from_file_location('script', {str(ROOT / 'launch' / script)!r}); "
        "module = sys.modules['script'] = importlib.util.module_from_spec(spec); spec.loader.exec_module(module); "
        "import capsdist.core.threads, capsdist.model; "
        "print('torch' in sys.modules, 'OMP_WAIT_POLICY' in os.environ)"
    )
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == ["True", "False"]  # torch only from capsdist.model, and no environment change


def test_processes_on_a_node_share_its_cores(monkeypatch):
    monkeypatch.setattr(threads.os, "sched_getaffinity", lambda pid: set(range(16)))
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    assert threads.process_cores() == 4
    monkeypatch.delenv("LOCAL_WORLD_SIZE")
    assert threads.process_cores() == 16


def test_num_workers_config_takes_auto_or_a_count(tiny_config):
    assert load_config(tiny_config, ["data.num_workers=auto"]).data.num_workers == "auto"
    assert load_config(tiny_config, ["data.num_workers=3"]).data.num_workers == 3
    with pytest.raises(ConfigError, match="data.num_workers"):
        load_config(tiny_config, ["data.num_workers=many"])
    with pytest.raises(ConfigError, match="data.num_workers: -1 must be >= 0"):
        load_config(tiny_config, ["data.num_workers=-1"])


def test_trainer_resolves_auto_once_sets_threads_and_logs_them(tiny_config, tmp_path, caplog, monkeypatch):
    threads_before = torch.get_num_threads()
    ticks = []  # the trainer's CpuShare, sampled once a step (its own tests: tests/test_cpu_share.py)
    monkeypatch.setattr(trainer.CpuShare, "tick", lambda self: ticks.append(self))
    cfg = load_config(tiny_config, ["data.num_workers=auto", "train.max_steps=2", "eval.test=false"])
    try:
        with caplog.at_level(logging.INFO, logger="capsdist"):
            trainer.Trainer(cfg, source=str(tiny_config)).fit()
        plan = threads.budget("auto")
        saved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
        assert saved["data"]["num_workers"] == plan.workers  # the count, so a resume elsewhere keeps the order
        assert torch.get_num_threads() == plan.threads
        assert sum("threads:" in r.getMessage() for r in caplog.records) == 1
        assert sum("cpu share:" in r.getMessage() for r in caplog.records) == 1 and len(ticks) == 2
        # a resumed run keeps the saved count even where auto would give another
        resumed = load_config(tiny_config, ["data.num_workers=auto", "train.max_steps=3", "eval.test=false"])
        saved["data"]["num_workers"] = 1
        (tmp_path / "run" / "config.yaml").write_text(yaml.safe_dump(saved))
        assert trainer.Trainer(resumed, source=str(tiny_config)).opts.num_workers == 1
    finally:
        torch.set_num_threads(threads_before)
