"""launch/bench.py times the trainer's own step: TrainStep on a model and fused optimizer that an Accelerator
prepared as the trainer's, and its output says what the timing includes and leaves out."""

from __future__ import annotations

import time

import torch

from capsdist.train.benchmark import BenchSettings, run_benchmark
from capsdist.config import load_config
from capsdist.model import fused_cpu
from capsdist.train import step as step_module


def test_the_bench_times_the_trainers_step(tiny_config, monkeypatch, fresh_accelerator):
    steps = []
    real = step_module.TrainStep.__call__

    def recording(self, *args, **kwargs):
        steps.append(self)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(step_module.TrainStep, "__call__", recording)
    cfg = load_config(tiny_config, ["optim.grad_clip=1.0"])
    out = run_benchmark(BenchSettings.from_config(cfg, batch_size=2, steps=2, warmup=1, device="cpu"))
    assert len(steps) == 3 and len(set(map(id, steps))) == 1  # warm-up and timed steps: the trainer's step
    optimizer = steps[0].optimizer
    assert type(optimizer).__name__ == "AcceleratedOptimizer" and optimizer.optimizer.defaults["fused"]
    assert all(torch.isfinite(p).all() for p in steps[0].model.parameters())
    assert out["step"] == "trainer"
    parts = " ".join(out["step_parts"])
    assert all(word in parts for word in ("all-reduce", "GuardedUpdate", "clipping at 1.0", "fused adam"))
    assert any("data loading" in part for part in out["step_leaves_out"])
    assert out["train_images_per_s"] > 0 and out["batch_size"] == 2
    assert out["routing"] == ("c" if fused_cpu.available() is None else "torch")  # auto on the CPU


def test_the_bench_shares_the_cpu_as_the_trainer_does(tiny_config, monkeypatch, fresh_accelerator):
    """The bench ticks a CpuShare each step, as the trainer does, and reports where it left the threads."""
    import capsdist.train.benchmark as bench_module

    ticks = []
    monkeypatch.setattr(bench_module.CpuShare, "tick", lambda self: ticks.append(time.monotonic()))
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    out = run_benchmark(
        BenchSettings.from_config(load_config(tiny_config), batch_size=2, steps=2, warmup=1, device="cpu")
    )
    assert len(ticks) == 3 and ticks == sorted(ticks)
    assert out["cpu_share"].startswith("cpu share: ") and out["intra_op_threads_at_end"] >= 1


def test_the_bench_profiles_the_step_by_operator_and_layer(tiny_config, fresh_accelerator):
    """--profile adds where the step's time goes: operators by self time, each top-level module's forward."""
    out = run_benchmark(
        BenchSettings.from_config(load_config(tiny_config), batch_size=2, steps=2, warmup=1, device="cpu", profile=True)
    )
    profile = out["profile"]
    ops = profile["ops"]
    assert ops and all(row["calls"] > 0 for row in ops)
    assert [row["self_cpu_ms"] for row in ops] == sorted((row["self_cpu_ms"] for row in ops), reverse=True)
    assert 0 < sum(row["share"] for row in ops) <= 1.0001 and any(row["op"].startswith("aten::") for row in ops)
    assert {"conv_caps1", "conv_caps2", "class_caps"} <= set(profile["forward_cpu_ms"])
    assert all(ms > 0 for ms in profile["forward_cpu_ms"].values())
    plain = run_benchmark(
        BenchSettings.from_config(load_config(tiny_config), batch_size=2, steps=1, warmup=0, device="cpu")
    )
    assert "profile" not in plain
