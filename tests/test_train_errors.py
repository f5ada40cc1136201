"""Errors stop the run before any work with a message naming key and file; non-finite losses are skipped."""

import math

import pytest
import torch

from capsdist.config import load_config
from capsdist.errors import TrainingError
from capsdist.train import checkpoint, trainer
from train_helpers import losses, run, tiny_config, tiny_shards, train_command, train_state  # noqa: F401


@pytest.mark.parametrize("override, words", [
    ("optim.learning_rate=0.1", ["optim.learning_rate", "unknown key"]),
    ("train.batch_size=many", ["train.batch_size", "integer"]),
    ("train.mixed_precision=fp8", ["train.mixed_precision", "bf16"]),
])
def test_config_errors_stop_before_any_work(tiny_config, tmp_path, override, words):
    result = run(train_command(tiny_config, "--set", override))
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    for word in words:
        assert word in result.stderr
    assert not (tmp_path / "run").exists()


def test_batch_not_divisible_by_world_size(tiny_config):
    result = run(train_command(tiny_config, "--set", "train.batch_size=15", procs=2))
    assert result.returncode != 0
    assert f"{tiny_config}: train.batch_size: 15 is not divisible by the 2 processes" in result.stderr


def test_missing_shards_name_the_prepare_command(tiny_config, tmp_path):
    result = run(train_command(tiny_config, "--set", f"data.shards={tmp_path / 'absent'}"))
    assert result.returncode == 2
    assert f"python launch/prepare_data.py fashion-mnist --out {tmp_path / 'absent'}" in result.stderr


def _nan_at(steps: set[int]):
    """A make_loss replacement whose loss is NaN at the given (0-based) global steps."""
    real = trainer.make_loss

    def make_loss(*args, **kwargs):
        loss_fn = real(*args, **kwargs)

        def patched(acts, labels, step):
            loss, margin = loss_fn(acts, labels, step)
            return (loss * math.nan if step in steps else loss), margin

        return patched

    return make_loss


def test_nonfinite_steps_are_skipped_and_counted(tiny_config, tmp_path, monkeypatch):
    monkeypatch.setattr(trainer, "make_loss", _nan_at({3, 4}))
    cfg = load_config(tiny_config, ["train.max_steps=8"])
    trainer.Trainer(cfg, source=str(tiny_config)).fit()
    logged = losses(tmp_path / "run")
    assert [s for s, v in logged.items() if v is None] == [4, 5]
    assert all(math.isfinite(v) for s, v in logged.items() if s not in (4, 5))
    state = train_state(tmp_path / "run" / "checkpoints" / "step-0000008")
    assert state["nonfinite_total"] == 2 and state["step"] == 8


def test_repeated_nonfinite_losses_stop_without_checkpointing_them(tiny_config, tmp_path, monkeypatch):
    monkeypatch.setattr(trainer, "make_loss", _nan_at(set(range(6, 100))))
    cfg = load_config(tiny_config, ["train.max_steps=50", "train.max_nonfinite=3", "checkpoint.every_steps=5"])
    with pytest.raises(TrainingError, match="3 non-finite losses in a row"):
        trainer.Trainer(cfg, source=str(tiny_config)).fit()
    assert [p.name for p in checkpoint.step_checkpoints(tmp_path / "run")] == ["step-0000005"]


def test_nan_weights_are_never_checkpointed():
    model = torch.nn.Linear(2, 2)
    checkpoint.assert_finite(model)
    with torch.no_grad():
        model.weight[0, 0] = math.nan
    with pytest.raises(TrainingError, match="weight is not finite"):
        checkpoint.assert_finite(model)
