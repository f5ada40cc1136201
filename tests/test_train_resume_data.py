"""A resume continues on the data it was trained on: other shards (another manifest) or another split (validation
strategy or fraction, viewpoint, seed) is refused, since it would put trained samples into validation; the same
shards at another place continue."""

from __future__ import annotations

import json
import logging
import shlex
import shutil

import pytest

from capsdist.config import load_config
from capsdist.core.errors import ConfigError
from capsdist.train import checkpoint, trainer
from test_checkpoint_safety import _rehash
from train_helpers import last_step


def _train(config, *overrides):
    trainer.Trainer(load_config(config, ["logging.every_steps=1", *overrides]), source=str(config)).fit()


@pytest.fixture
def trained(tiny_config, tmp_path):
    """tiny_config after 3 steps (checkpoint step-3)."""
    _train(tiny_config, "train.max_steps=3")
    return tiny_config


@pytest.mark.parametrize(
    "override, change, restore",
    [
        ("data.val_fraction=0.2", "data.val_fraction 0.1 -> 0.2", "data.val_fraction=0.1"),
        ("train.seed=1", "train.seed 0 -> 1", "train.seed=0"),
    ],
)
def test_a_resume_on_another_split_is_refused(trained, tmp_path, override, change, restore):
    with pytest.raises(ConfigError) as err:
        _train(trained, "train.max_steps=6", override)
    message = str(err.value)
    assert "step-0000003" in message and change in message and "validation" in message
    assert f"--set {restore}" in message and "--run-dir" in message
    assert last_step(tmp_path / "run") == 3


def test_a_resume_on_other_shards_is_refused(trained, tiny_shards, tmp_path):
    other = tmp_path / "other shards"  # a space: the hint is shell-quoted
    shutil.copytree(tiny_shards, other)
    manifest = json.loads((other / "manifest.json").read_text())
    (other / "manifest.json").write_text(json.dumps({**manifest, "capsdist_version": "0.0.0"}))  # prepared again
    with pytest.raises(ConfigError) as err:
        _train(trained, "train.max_steps=6", f"data.shards={other}")
    message = str(err.value)
    assert "manifest" in message and "data.shards" in message
    assert f"--set {shlex.quote(f'data.shards={tiny_shards}')}" in message
    assert last_step(tmp_path / "run") == 3


def test_the_same_shards_elsewhere_continue(trained, tiny_shards, tmp_path, caplog):
    moved = tmp_path / "moved"
    shutil.copytree(tiny_shards, moved)
    with caplog.at_level(logging.WARNING):
        _train(trained, "train.max_steps=6", f"data.shards={moved}")
    assert last_step(tmp_path / "run") == 6
    assert f"data.shards {tiny_shards} -> {moved}" in caplog.text and "same manifest" in caplog.text


def test_a_checkpoint_without_a_record_of_its_data_resumes_with_a_warning(trained, tmp_path, caplog):
    newest = tmp_path / "run" / "checkpoints" / "step-0000003"
    state_file = newest / checkpoint.STATE_FILE
    state = json.loads(state_file.read_text())
    state.pop("data")  # as capsdist wrote it before the data was recorded
    state_file.write_text(json.dumps(state))
    _rehash(newest)
    with caplog.at_level(logging.WARNING):
        _train(trained, "train.max_steps=6")
    assert last_step(tmp_path / "run") == 6
    assert "no record of the data it was trained on" in caplog.text
