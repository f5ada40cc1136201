"""The trainer's steps never read a device value on the host: only host steps (log, evaluation, checkpoint, epoch
end) do, once each. A CUDA-free stand-in: every Tensor method that moves a value to the host is wrapped to count
its calls, by phase of the trainer. The step's all-reduced vector (non-finite flag, stop request, correct count,
loss sum, skipped samples) is read once per host step."""

from __future__ import annotations

import pytest
import torch

from capsdist.config import load_config
from capsdist.train import trainer
from capsdist.train.metrics import MetricsLogger
from train_helpers import losses, metrics

HOST_READS = ("item", "tolist", "numpy", "cpu", "__bool__", "__float__", "__int__", "__index__")


@pytest.fixture
def host_reads(monkeypatch):
    """A list of (phase, method) for every host read of a tensor made during Trainer._train_step ("step") or
    MetricsLogger.flush ("flush")."""
    reads, phase = [], []
    for name in HOST_READS:
        original = getattr(torch.Tensor, name)

        def counting(self, *args, _original=original, _name=name, **kwargs):
            if phase:
                reads.append((phase[-1], _name))
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counting)
    for owner, method, label in ((trainer.Trainer, "_train_step", "step"), (MetricsLogger, "flush", "flush")):
        original = getattr(owner, method)

        def in_phase(self, *args, _original=original, _label=label, **kwargs):
            phase.append(_label)
            try:
                return _original(self, *args, **kwargs)
            finally:
                phase.pop()

        monkeypatch.setattr(owner, method, in_phase)
    return reads


def test_steps_read_nothing_and_each_host_step_reads_once(tiny_config, host_reads, tmp_path):
    cfg = load_config(
        tiny_config,
        [
            "train.max_steps=8",
            "logging.every_steps=4",
            "checkpoint.every_steps=0",
            "eval.every_steps=0",
            "model.iterations=2",
        ],
    )
    trainer.Trainer(cfg, source=str(tiny_config)).fit()
    assert [read for read in host_reads if read[0] == "step"] == []
    # host steps: the log steps 4 and 8 (the final evaluation and checkpoint find nothing pending)
    assert [read for read in host_reads if read[0] == "flush"] == [("flush", "tolist")] * 2
    logged = losses(tmp_path / "run")
    assert sorted(logged) == list(range(1, 9)) and all(v is not None for v in logged.values())
    steps = [m for m in metrics(tmp_path / "run") if "train/loss" in m]
    assert all(m["train/skipped"] == 0 and m["train/nonfinite_total"] == 0 for m in steps)  # read from the device
    assert {"grad_norm/total", "perf/images_per_s"} <= {k for m in metrics(tmp_path / "run") for k in m}
