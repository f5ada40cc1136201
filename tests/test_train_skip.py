"""The step skip under every mixed precision: a step whose loss or gradients are not finite leaves the weights and
the optimizer state as they were (decided on the device), and gradient norms are logged unscaled.

On the CPU Accelerate runs bf16 with autocast, but fp16 without autocast and without a gradient scaler (it makes
one only on an accelerator): the fp16 runs here give the Accelerator the GradScaler Accelerate makes on a GPU, so
the trainer's fp16 path (scaled backward, dynamic scale, scaler.pt in checkpoints) runs in float32 on the CPU.
"""

import math

import pytest
import torch
from accelerate.state import AcceleratorState

from capsdist.config import load_config
from capsdist.train import trainer
from train_helpers import faulty_loss, losses, metrics


class _NanGrad(torch.autograd.Function):
    """The identity, whose gradient is NaN."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * math.nan


FAULTS = {
    "nan_loss": lambda loss: loss + loss.detach() * math.nan,  # a NaN loss whose gradients are finite
    "nan_grads": _NanGrad.apply,  # a finite loss with NaN gradients
}


def _gpu_like_fp16(monkeypatch) -> None:
    real = trainer.make_accelerator

    def make_accelerator(cfg, **kwargs):
        accelerator = real(cfg, **kwargs)
        accelerator.scaler = torch.amp.GradScaler("cpu")  # as Accelerate makes it for fp16 on a GPU
        return accelerator

    monkeypatch.setattr(trainer, "make_accelerator", make_accelerator)


def _record_updates(monkeypatch) -> list[bool]:
    """Whether each training step changed the weights or the optimizer state (moments, step counts)."""
    changed = []
    real = trainer.Trainer._train_step

    def train_step(self, batch):
        before = _snapshot(self)
        real(self, batch)
        after = _snapshot(self)
        changed.append(len(before) != len(after) or not all(torch.equal(a, b) for a, b in zip(before, after)))

    monkeypatch.setattr(trainer.Trainer, "_train_step", train_step)
    return changed


def _snapshot(run: trainer.Trainer) -> list[torch.Tensor]:
    optimizer = run.optimizer.optimizer
    params = list(run.model.parameters())
    state = [value for p in params for value in optimizer.state.get(p, {}).values()]
    return [t.detach().clone() for t in params + state]


@pytest.mark.parametrize("precision", ["no", "bf16", "fp16"])
@pytest.mark.parametrize("fault", sorted(FAULTS))
def test_a_nonfinite_step_changes_nothing(tiny_config, tmp_path, monkeypatch, fresh_accelerator, precision, fault):
    if precision == "fp16":
        _gpu_like_fp16(monkeypatch)
    monkeypatch.setattr(trainer, "make_loss", faulty_loss({3}, FAULTS[fault]))
    changed = _record_updates(monkeypatch)
    cfg = load_config(tiny_config, ["train.max_steps=6", f"train.mixed_precision={precision}"])
    run = trainer.Trainer(cfg, source=str(tiny_config))
    run.fit()
    assert changed == [True, True, True, False, True, True]  # step 4 was skipped, the others applied
    assert all(torch.isfinite(p).all() for p in run.model.parameters())
    step4 = next(m for m in metrics(tmp_path / "run") if m["step"] == 4 and "train/loss" in m)
    assert step4["train/nonfinite_total"] == 1
    assert (step4["train/loss"] is None) == (fault == "nan_loss")


def test_gradient_norms_are_logged_unscaled_under_fp16(tiny_config, tmp_path, monkeypatch, fresh_accelerator):
    """fp16 scales the loss by 2**16 for backward; the logged norms are those of the true gradients, as without."""
    norms = {}
    for precision in ("no", "fp16"):
        AcceleratorState._reset_state(reset_partial_state=True)
        if precision == "fp16":
            _gpu_like_fp16(monkeypatch)
        run_dir = tmp_path / precision
        overrides = ["train.max_steps=4", "logging.every_steps=2", f"train.mixed_precision={precision}"]
        cfg = load_config(tiny_config, [*overrides, f"run_dir={run_dir}"])
        trainer.Trainer(cfg, source=str(tiny_config)).fit()
        norms[precision] = [m["grad_norm/total"] for m in metrics(run_dir) if "grad_norm/total" in m]
    assert len(norms["no"]) == 2 and norms["fp16"] == pytest.approx(norms["no"], rel=1e-6)
    assert losses(tmp_path / "fp16") == losses(tmp_path / "no")  # float32 either way: the same steps
