"""Where the run writes: a full disk, a read-only place or a file where a directory belongs is a message saying
what to do (found at the start, before any training work, where possible), never a traceback, an empty
wandb_id.txt or a lost checkpoint; evaluate.py on a read-only run still prints its result.

Tests may run as root, where chmod does not stop writes: then a read-only place is simulated (`read_only`) by
making every write under it fail as the kernel would (EROFS). A full disk is always simulated (`disk_full`): the
file is created, its writes fail with ENOSPC."""

from __future__ import annotations

import builtins
import errno
import io
import os
import shutil
import stat
from pathlib import Path
from types import SimpleNamespace

import pytest
from accelerate import Accelerator

from capsdist.config import load_config
from capsdist.core.errors import StorageError
from capsdist.experiments.evaluate import evaluate_run
from capsdist.core.files import write_atomic
from capsdist.train import checkpoint, trainer
from capsdist.train.tracking import wandb_settings
from train_helpers import metrics

_REAL_OPEN, _REAL_MKDIR = builtins.open, os.mkdir


def _under(path, root: Path) -> bool:
    path = Path(os.fsdecode(path)).absolute()
    return path == root or root in path.parents


def _writes(mode: str) -> bool:
    return any(c in mode for c in "wax+")


class _FullFile:
    """A file just created on a full disk: every write fails with ENOSPC."""

    def __init__(self, file):
        self._file = file

    def write(self, data):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def __getattr__(self, name):
        return getattr(self._file, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._file.close()


@pytest.fixture
def disk_full(monkeypatch):
    """disk_full(root): files opened for writing at or under `root` are created, and their writes fail (ENOSPC)."""

    def fill(root: Path) -> None:
        root = root.absolute()

        def fake_open(file, mode="r", *args, **kwargs):
            opened = _REAL_OPEN(file, mode, *args, **kwargs)
            return (
                _FullFile(opened)
                if isinstance(file, (str, os.PathLike)) and _writes(mode) and _under(file, root)
                else opened
            )

        monkeypatch.setattr(builtins, "open", fake_open)
        monkeypatch.setattr(io, "open", fake_open)

    return fill


@pytest.fixture
def read_only(monkeypatch):
    """read_only(root): nothing can be created or written at or under the existing directory `root` (chmod a-w;
    as root, where chmod does not stop writes, every such write and mkdir fails with EROFS)."""
    changed: list[tuple[Path, int]] = []

    def freeze(root: Path) -> None:
        root = root.absolute()
        if os.geteuid() != 0:
            for path in [root, *(p for p in root.rglob("*") if p.is_dir())]:
                changed.append((path, path.stat().st_mode))
                path.chmod(path.stat().st_mode & ~(stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH))
            return

        def refuse(path):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), os.fsdecode(path))

        def fake_open(file, mode="r", *args, **kwargs):
            if isinstance(file, (str, os.PathLike)) and _writes(mode) and _under(file, root):
                refuse(file)
            return _REAL_OPEN(file, mode, *args, **kwargs)

        def fake_mkdir(path, *args, **kwargs):
            if _under(path, root):
                refuse(path)
            return _REAL_MKDIR(path, *args, **kwargs)

        monkeypatch.setattr(builtins, "open", fake_open)
        monkeypatch.setattr(io, "open", fake_open)
        monkeypatch.setattr(os, "mkdir", fake_mkdir)

    yield freeze
    for path, mode in reversed(changed):
        path.chmod(mode)


def _config(tiny_config, *overrides):
    return load_config(tiny_config, ["train.max_steps=6", *overrides])


@pytest.mark.parametrize("where", ["run_dir", "checkpoints", "wandb"])
def test_a_file_where_a_run_directory_belongs_is_a_message_at_the_start(tiny_config, tmp_path, where):
    run_dir = tmp_path / "run"
    blocked = {"run_dir": run_dir, "checkpoints": run_dir / "checkpoints", "wandb": run_dir / "wandb"}[where]
    blocked.parent.mkdir(parents=True, exist_ok=True)
    blocked.write_text("not a directory")
    cfg = _config(tiny_config, "logging.wandb.mode=offline")
    with pytest.raises(StorageError, match=f"{blocked} is a file, not a directory"):
        trainer.Trainer(cfg, source=str(tiny_config))  # at the start: no training step, no evaluation
    assert not metrics(run_dir)


@pytest.mark.parametrize("where", ["run_dir", "wandb"])
def test_a_read_only_run_directory_is_a_message_at_the_start(tiny_config, tmp_path, read_only, where):
    run_dir = tmp_path / "run"
    (run_dir / "wandb").mkdir(parents=True)
    read_only(run_dir if where == "run_dir" else run_dir / "wandb")
    cfg = _config(tiny_config, "logging.wandb.mode=offline")
    with pytest.raises(StorageError, match="cannot write .*: .*; make it writable or choose another place"):
        trainer.Trainer(cfg, source=str(tiny_config))
    assert not metrics(run_dir)


def test_a_full_disk_at_the_first_start_leaves_no_empty_wandb_id(tiny_config, tmp_path, disk_full):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    disk_full(run_dir)
    cfg = _config(tiny_config, "logging.wandb.mode=offline")
    with pytest.raises(StorageError, match=f"no space left on {run_dir}"):
        wandb_settings(cfg, run_dir, is_main=True)
    assert list(run_dir.rglob("*wandb_id*")) == []


@pytest.mark.parametrize("found", ["", "\n", "\x00\x00\x00", "not an id!"])
def test_an_empty_or_corrupt_wandb_id_is_replaced(tiny_config, tmp_path, capsys, found):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "wandb_id.txt").write_text(found)
    settings = wandb_settings(_config(tiny_config, "logging.wandb.mode=offline"), run_dir, is_main=True)
    assert settings["id"] and settings["id"].isalnum()
    assert (run_dir / "wandb_id.txt").read_text() == settings["id"]
    assert "holds no W&B run id" in capsys.readouterr().out


def test_write_atomic_on_a_full_disk_leaves_neither_file(tmp_path, disk_full):
    disk_full(tmp_path)
    with pytest.raises(StorageError, match=f"no space left on {tmp_path / 'out.json'}"):
        write_atomic(tmp_path / "out.json", b"{}")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("failure", ["ENOSPC", "torch"])
def test_a_full_disk_at_a_checkpoint_is_a_message_and_keeps_the_older_ones(tiny_config, tmp_path, monkeypatch, failure):
    """torch.save's C++ writer says only `basic_ios::clear` on a full disk: the free space tells."""
    run_dir = tmp_path / "run"
    cfg = _config(tiny_config, "train.max_steps=10", "checkpoint.every_steps=5")
    real_save_state = Accelerator.save_state

    def save_state(self, output_dir, **kwargs):
        if output_dir.endswith("step-0000010"):
            Path(output_dir).mkdir()
            Path(output_dir, "model.safetensors").write_bytes(b"partial")
            if failure == "ENOSPC":
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            monkeypatch.setattr(shutil, "disk_usage", lambda path: SimpleNamespace(total=10**9, used=10**9, free=0))
            raise RuntimeError("basic_ios::clear: iostream error")
        return real_save_state(self, output_dir, **kwargs)

    monkeypatch.setattr(Accelerator, "save_state", save_state)
    with pytest.raises(StorageError, match=f"no space left on {run_dir / 'checkpoints'}"):
        trainer.Trainer(cfg, source=str(tiny_config)).fit()
    assert [p.name for p in checkpoint.step_checkpoints(run_dir)] == ["step-0000005"]
    assert checkpoint.verify(run_dir / "checkpoints" / "step-0000005") is None
    assert not [p for p in (run_dir / "checkpoints").iterdir() if p.name.startswith(".tmp-")]  # space given back


def test_a_full_disk_under_metrics_is_a_message(tiny_config, tmp_path, disk_full):
    disk_full(tmp_path / "run" / "metrics.jsonl")
    run = trainer.Trainer(_config(tiny_config), source=str(tiny_config))
    with pytest.raises(StorageError, match=f"no space left on {tmp_path / 'run' / 'metrics.jsonl'}"):
        run.fit()


def test_evaluate_on_a_read_only_run_prints_its_result(tiny_config, tmp_path, read_only, capsys):
    run_dir = tmp_path / "run"
    trainer.Trainer(_config(tiny_config, "train.max_steps=2"), source=str(tiny_config)).fit()
    capsys.readouterr()
    read_only(run_dir)
    result = evaluate_run(run_dir, "latest", "test")
    out, err = capsys.readouterr()
    assert f"test accuracy {result['accuracy']:.4f}" in out and "confusion matrix" in out
    assert "not saved" in err and f"cannot write {run_dir}" in err
    assert not list(run_dir.glob("eval-*.json"))
