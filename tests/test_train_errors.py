"""Errors stop the run before any work with a message naming key and file; non-finite losses are skipped."""

import hashlib
import json
import math
import shutil
import tarfile

import pytest
import torch
import yaml

from capsdist.config import load_config
from capsdist.data.manifest import load_manifest
from capsdist.data.plan import select
from capsdist.core.errors import TrainingError
from capsdist.train import checkpoint, trainer
from train_helpers import STEPS_PER_EPOCH, faulty_loss, losses, metrics, run, train_command, train_state


@pytest.mark.parametrize(
    "override, words",
    [
        ("optim.learning_rate=0.1", ["optim.learning_rate", "unknown key"]),
        ("train.batch_size=many", ["train.batch_size", "integer"]),
        ("train.mixed_precision=fp8", ["train.mixed_precision", "bf16"]),
    ],
)
@pytest.mark.e2e
def test_config_errors_stop_before_any_work(tiny_config, tmp_path, override, words):
    result = run(train_command(tiny_config, "--set", override))
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    for word in words:
        assert word in result.stderr
    assert not (tmp_path / "run").exists()


@pytest.mark.e2e
def test_batch_not_divisible_by_world_size(tiny_config):
    result = run(train_command(tiny_config, "--set", "train.batch_size=15", procs=2))
    assert result.returncode != 0
    assert f"{tiny_config}: train.batch_size: 15 is not divisible by the 2 processes" in result.stderr


@pytest.mark.e2e
def test_missing_shards_name_the_prepare_command(tiny_config, tmp_path):
    result = run(train_command(tiny_config, "--set", f"data.shards={tmp_path / 'absent'}"))
    assert result.returncode == 2
    assert f"python launch/prepare_data.py fashion-mnist --out {tmp_path / 'absent'}" in result.stderr


def test_nonfinite_steps_are_skipped_and_counted(tiny_config, tmp_path, monkeypatch):
    monkeypatch.setattr(trainer, "make_loss", faulty_loss({3, 4}))
    cfg = load_config(tiny_config, ["train.max_steps=8"])
    trainer.Trainer(cfg, source=str(tiny_config)).fit()
    logged = losses(tmp_path / "run")
    assert [s for s, v in logged.items() if v is None] == [4, 5]
    assert all(math.isfinite(v) for s, v in logged.items() if s not in (4, 5))
    state = train_state(tmp_path / "run" / "checkpoints" / "step-0000008")
    assert state["nonfinite_total"] == 2 and state["step"] == 8
    # the checkpoint due at step 5 came during the two skipped steps: not written; the next one is
    assert [p.name for p in checkpoint.step_checkpoints(tmp_path / "run")] == ["step-0000008"]


def test_repeated_nonfinite_losses_stop_without_checkpointing_them(tiny_config, tmp_path, monkeypatch):
    monkeypatch.setattr(trainer, "make_loss", faulty_loss(set(range(6, 100))))
    cfg = load_config(tiny_config, ["train.max_steps=50", "train.max_nonfinite=3", "checkpoint.every_steps=5"])
    with pytest.raises(TrainingError, match="3 non-finite steps in a row"):
        trainer.Trainer(cfg, source=str(tiny_config)).fit()
    assert [p.name for p in checkpoint.step_checkpoints(tmp_path / "run")] == ["step-0000005"]


def test_no_checkpoint_during_a_nonfinite_streak_and_the_stop_names_the_last_healthy_one(
    tiny_config, tmp_path, monkeypatch
):
    """Steps 7-12 are skipped (their weights stay finite): the checkpoints due at steps 8 and 10 are not written,
    so retention keeps step-4 and step-6, and the stop at step 12 names step-6."""
    monkeypatch.setattr(trainer, "make_loss", faulty_loss(set(range(6, 100))))
    cfg = load_config(tiny_config, ["train.max_steps=50", "train.max_nonfinite=6", "checkpoint.every_steps=2"])
    healthy = tmp_path / "run" / "checkpoints" / "step-0000006"
    with pytest.raises(TrainingError, match="6 non-finite steps in a row") as stop:
        trainer.Trainer(cfg, source=str(tiny_config)).fit()
    assert f"the last healthy checkpoint is {healthy} (step 6)" in str(stop.value)
    assert [p.name for p in checkpoint.step_checkpoints(tmp_path / "run")] == ["step-0000004", "step-0000006"]


def test_nan_weights_are_never_checkpointed():
    model = torch.nn.Linear(2, 2)
    checkpoint.assert_finite(model)
    with torch.no_grad():
        model.weight[0, 0] = math.nan
    with pytest.raises(TrainingError, match="weight is not finite"):
        checkpoint.assert_finite(model)


@pytest.fixture
def holey_config(tiny_config, tiny_shards, tmp_path) -> tuple:
    """tiny_config on a copy of the tiny shards whose last training shard (20 of 320 samples) is an empty tar."""
    holey = tmp_path / "holey"
    shutil.copytree(tiny_shards, holey)
    manifest = load_manifest(holey)
    shard = manifest.splits["train"].shards[-1]
    with tarfile.open(holey / shard.name, "w"):
        pass
    raw = json.loads((holey / "manifest.json").read_text())
    raw["splits"]["train"]["shards"][-1]["sha256"] = hashlib.sha256((holey / shard.name).read_bytes()).hexdigest()
    (holey / "manifest.json").write_text(json.dumps(raw))
    cfg = yaml.safe_load(tiny_config.read_text())
    cfg["data"].update(shards=str(holey), skip_corrupt=True)
    tiny_config.write_text(yaml.safe_dump(cfg))
    _, train = select(manifest, "train", val_strategy="random", val_fraction=0.1, viewpoint="none", seed=0)
    lost = int(((train >= shard.first_index) & (train < shard.first_index + shard.num_samples)).sum())
    return tiny_config, lost


def test_skipped_samples_are_counted_warned_and_bounded(holey_config, tmp_path, caplog):
    config, lost = holey_config
    cfg = load_config(config, [f"train.max_steps={STEPS_PER_EPOCH}", "data.max_skipped_fraction=0.5"])
    trainer.Trainer(cfg, source=str(config)).fit()
    steps = [m for m in metrics(tmp_path / "run") if "train/loss" in m]
    assert len(steps) == STEPS_PER_EPOCH and all("train/skipped" in m for m in steps)
    assert sum(m["train/skipped"] for m in steps) == steps[-1]["train/skipped_total"] == lost > 0
    assert "corrupt training samples skipped" in caplog.text
    shutil.rmtree(tmp_path / "run")
    cfg = load_config(config, [f"train.max_steps={STEPS_PER_EPOCH}", "data.max_skipped_fraction=0.01"])
    with pytest.raises(
        TrainingError,
        match=r"epoch 0: \d+ corrupt training samples skipped, more than "
        r"data.max_skipped_fraction 0.01 of its 288",
    ):
        trainer.Trainer(cfg, source=str(config)).fit()
