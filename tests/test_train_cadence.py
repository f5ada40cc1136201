"""The trainer's parts act at their steps: the evaluator at every eval.every_steps, each epoch end and the last step,
once each; the checkpointer at its cadence, after each evaluation and at the end; a stop request that a host step
reads takes effect at that host step."""

from __future__ import annotations

from capsdist.config import load_config
from capsdist.train import checkpoint, trainer
from capsdist.train import step as step_module
from train_helpers import BATCH, STEPS_PER_EPOCH, losses, metrics, train_state


def test_evaluations_and_checkpoints_fall_on_their_steps(tiny_config, tmp_path):
    cfg = load_config(
        tiny_config,
        ["eval.every_steps=7", "checkpoint.every_steps=4", "checkpoint.keep_last=20", "train.max_steps=23"],
    )
    result = trainer.Trainer(cfg, source=str(tiny_config)).fit()
    evaluated = [m["step"] for m in metrics(tmp_path / "run") if "val/accuracy" in m]
    assert STEPS_PER_EPOCH == 18 and evaluated == [7, 14, 18, 21, 23]  # every 7, the epoch end, the last step
    saved = [train_state(path)["step"] for path in checkpoint.step_checkpoints(tmp_path / "run")]
    assert saved == [4, 7, 8, 12, 14, 16, 18, 20, 21, 23]  # every 4, and each evaluation
    assert train_state(checkpoint.latest(tmp_path / "run"))["epoch"] == 1  # the epoch end moved the position on
    assert result["step"] == 23


def test_a_stop_request_read_at_a_checkpoint_step_takes_effect_there(tiny_config, tmp_path, monkeypatch):
    """Step 2 asks to stop (as another rank's signal would, through the step's all-reduce); step 3, a checkpoint
    step that is not a log step, is the next host step: it checkpoints and the run ends, without another step."""
    real = step_module.TrainStep.__call__

    def stop_at_step_2(self, images, labels, images_seen, **kwargs):
        return real(self, images, labels, images_seen, **{**kwargs, "stop": images_seen // BATCH == 1})

    monkeypatch.setattr(step_module.TrainStep, "__call__", stop_at_step_2)
    cfg = load_config(tiny_config, ["logging.every_steps=4", "checkpoint.every_steps=3", "train.max_steps=12"])
    result = trainer.Trainer(cfg, source=str(tiny_config)).fit()
    assert sorted(losses(tmp_path / "run")) == [1, 2, 3]
    assert train_state(checkpoint.latest(tmp_path / "run"))["step"] == 3
    assert result == {}  # no evaluation on the way out
