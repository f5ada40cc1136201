"""Commands printed in messages are shell-quoted: pasted into a shell they work whatever the paths hold (the W&B
sync command: test_train_wandb.py::test_online_without_a_network_falls_back_to_offline)."""

from __future__ import annotations

import re
import shlex
from types import SimpleNamespace

import pytest

from capsdist.config import load_config
from capsdist.core.errors import DataError, TrainingError
from capsdist.train.build import data_options, load_data
from capsdist.train import trainer
from train_helpers import faulty_loss

ODD = "it's a run dir"  # a space and a quote


def test_the_resume_hint_is_shell_quoted(tiny_config, tmp_path, monkeypatch):
    monkeypatch.setattr(trainer, "make_loss", faulty_loss(set(range(100))))
    run_dir = tmp_path / ODD
    cfg = load_config(tiny_config, [f"run_dir={run_dir}", "train.max_nonfinite=1", "logging.every_steps=1"])
    with pytest.raises(TrainingError) as err:
        trainer.Trainer(cfg, source=str(tiny_config)).fit()
    assert "--resume auto --run-dir " in str(err.value)
    words = shlex.shlex(str(err.value).split("--resume auto --run-dir ", 1)[1], posix=True)
    words.whitespace_split = True
    assert words.get_token() == str(run_dir)  # the next shell word, whatever text follows it


def test_the_prepare_command_is_shell_quoted(tiny_config, tmp_path):
    shards = tmp_path / ODD / "fashion-mnist"
    cfg = load_config(tiny_config, [f"data.shards={shards}", "data.prepare=never"])
    rank0 = SimpleNamespace(is_main_process=True, wait_for_everyone=lambda: None)
    with pytest.raises(DataError) as err:
        load_data(cfg, rank0, data_options(cfg))
    (command,) = re.findall(r"run `([^`]*)`", str(err.value))
    assert shlex.split(command) == ["python", "launch/prepare_data.py", "fashion-mnist", "--out", str(shards)]
