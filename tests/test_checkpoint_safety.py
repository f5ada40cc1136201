"""Checkpoints are data: crafted pickles are refused, damage is detected and survived, rollbacks keep the new
branch, and a kill while deleting or replacing a checkpoint leaves every `step-*` and `best` usable."""

from __future__ import annotations

import hashlib
import json
import pickle
import re
import shutil
import sys
from pathlib import Path

import pytest
import torch

from capsdist.core.errors import CheckpointError
from capsdist.train import checkpoint, trainer
from capsdist.config import load_config
from train_helpers import REPO, metrics, run, train_command, train_state, weights, write_tiny_config


@pytest.fixture(scope="module")
def trained(tiny_shards, tmp_path_factory) -> Path:
    """A tiny run of 6 steps with checkpoints step-3, step-6 and best (do not modify: copy it)."""
    root = tmp_path_factory.mktemp("trained")
    config = write_tiny_config(root / "tiny.yaml", tiny_shards, root / "run")
    done = run(train_command(config, "--max-steps", "6", "--checkpoint-every", "3"))
    assert done.returncode == 0, done.stderr[-3000:]
    return root / "run"


@pytest.fixture
def run_dir(trained, tmp_path) -> Path:
    """A copy of the trained run, with the config's run_dir pointing at it."""
    copy = tmp_path / "run"
    shutil.copytree(trained, copy)
    config = copy / "config.yaml"
    config.write_text(config.read_text().replace(str(trained), str(copy)))
    return copy


def _rehash(ckpt: Path) -> None:
    """Make checkpoint.json agree with the files as they are now (what an attacker would do)."""
    meta_file = ckpt / checkpoint.META
    meta = json.loads(meta_file.read_text())
    for name in meta["files"]:
        data = (ckpt / name).read_bytes()
        meta["files"][name] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    meta_file.write_text(json.dumps(meta))


class _Plant:
    """A pickle whose loading creates `marker` (stands for any shell command)."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


def _evaluate(run_dir: Path, which: str):
    return run([sys.executable, str(REPO / "launch" / "evaluate.py"), "--run-dir", str(run_dir), "--checkpoint", which])


@pytest.mark.e2e
def test_a_checkpoint_never_runs_code(run_dir, tmp_path):
    marker = tmp_path / "pwned"
    bad = pickle.dumps(_Plant(marker))
    step6 = run_dir / "checkpoints" / "step-0000006"
    # today's format, every pickle-format file replaced and the checksums made to agree
    for name in ("optimizer.bin", "random_states_0.pkl"):
        (step6 / name).write_bytes(bad)
    _rehash(step6)
    resumed = run(train_command(run_dir / "config.yaml", "--resume", str(step6), "--max-steps", "8"))
    assert resumed.returncode == 2 and "Traceback" not in resumed.stderr, resumed.stderr[-3000:]
    assert "refused to load" in resumed.stderr and "pickled objects" in resumed.stderr
    # the older, pickled layout (custom_checkpoint_0.pkl: TrainState) is never unpickled
    step3 = run_dir / "checkpoints" / "step-0000003"
    (step3 / checkpoint.META).unlink()
    (step3 / "custom_checkpoint_0.pkl").write_bytes(bad)
    for result in (
        run(train_command(run_dir / "config.yaml", "--resume", str(step3), "--max-steps", "8")),
        _evaluate(run_dir, str(step3)),
    ):
        assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-3000:]
        assert "not a usable checkpoint" in result.stderr and "never loaded" in result.stderr
    assert not marker.exists()


@pytest.mark.parametrize("change", ["deleted", "replaced"])
def test_evaluation_reads_the_checkpoint_it_verified(run_dir, monkeypatch, change):
    """A training run's retention (or a new `best`) can take the checkpoint away between its verification and its
    reading: the evaluation then stops with a message saying so, never a FileNotFoundError or another one's weights."""
    from capsdist.experiments.evaluate import evaluate_run

    real = checkpoint.resolve

    def resolve_then_change(run_dir, which):
        path = real(run_dir, which)
        if change == "deleted":
            shutil.rmtree(path)
        else:  # the weights of another checkpoint under this one's name
            shutil.copy(path.parent / "step-0000003" / checkpoint.WEIGHTS_FILE, path / checkpoint.WEIGHTS_FILE)
        return path

    monkeypatch.setattr(checkpoint, "resolve", resolve_then_change)
    newest = run_dir / "checkpoints" / "step-0000006"
    with pytest.raises(CheckpointError, match=re.escape(f"{newest}: {change} while it was read")):
        evaluate_run(run_dir, "latest", "val")


def _flip(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x5A
    path.write_bytes(bytes(data))


@pytest.mark.parametrize(
    "damage, words",
    [
        (lambda c: (c / "model.safetensors").write_bytes(b""), "model.safetensors has 0 bytes"),
        (
            lambda c: (c / "optimizer.bin").write_bytes((c / "optimizer.bin").read_bytes()[:100]),
            "optimizer.bin has 100",
        ),
        (lambda c: _flip(c / "model.safetensors", 3), "model.safetensors does not match"),  # the header's length
        (lambda c: _flip(c / "random_states_0.pkl", 200), "random_states_0.pkl does not match"),
        (lambda c: (c / "random_states_0.pkl").unlink(), "random_states_0.pkl is missing"),
        (lambda c: (c / "trainer_state.json").unlink(), "trainer_state.json is missing"),
        (lambda c: (c / checkpoint.META).write_text("{"), "checkpoint.json is unreadable"),
    ],
)
def test_a_damaged_checkpoint_is_named_and_skipped(run_dir, damage, words, caplog):
    newest = run_dir / "checkpoints" / "step-0000006"
    damage(newest)
    with pytest.raises(CheckpointError, match=re.escape(words)):
        checkpoint.resolve(run_dir, str(newest))
    assert checkpoint.resolve(run_dir, "latest") == run_dir / "checkpoints" / "step-0000003"
    assert words in caplog.text and "step-0000006 is unusable" in caplog.text


def test_flipped_weights_are_detected(run_dir):
    """A byte flipped inside the weights (not the header) loads fine as safetensors: only the checksum sees it."""
    newest = run_dir / "checkpoints" / "step-0000006"
    _flip(newest / "model.safetensors", (newest / "model.safetensors").stat().st_size - 10)
    with pytest.raises(CheckpointError, match="model.safetensors does not match its sha256"):
        checkpoint.resolve(run_dir, str(newest))


@pytest.mark.e2e
def test_resume_auto_falls_back_and_an_explicit_bad_path_fails(run_dir):
    newest = run_dir / "checkpoints" / "step-0000006"
    (newest / "optimizer.bin").write_bytes(b"")
    explicit = run(train_command(run_dir / "config.yaml", "--resume", str(newest), "--max-steps", "8"))
    assert explicit.returncode == 2 and "Traceback" not in explicit.stderr
    assert f"{newest}: not a usable checkpoint: optimizer.bin has 0 bytes" in explicit.stderr
    auto = run(train_command(run_dir / "config.yaml", "--resume", "auto", "--max-steps", "8"))
    assert auto.returncode == 0, auto.stderr[-3000:]
    assert "step-0000006 is unusable (optimizer.bin has 0 bytes, " in auto.stderr
    assert [m["step"] for m in metrics(run_dir) if "event/start" in m][-1] == 3
    assert train_state(run_dir / "checkpoints" / "step-0000008")["step"] == 8
    assert [p.name for p in checkpoint.step_checkpoints(run_dir)] == ["step-0000006", "step-0000008"]  # a new 6
    (abandoned,) = (run_dir / "checkpoints").glob("abandoned-*")
    assert checkpoint.verify(abandoned / "step-0000006") is not None  # the damaged one, kept for a post-mortem


def _as_format_2(ckpt: Path) -> None:
    """Rewrite a checkpoint as capsdist wrote it before the learning rate became a function of the step: format 2,
    whose trainer_state.json also holds the LambdaLR's state dict."""
    state_file = ckpt / checkpoint.STATE_FILE
    state = json.loads(state_file.read_text())
    step = state["train"]["step"]
    state["train"]["version"] = 2
    state["scheduler"] = {
        "base_lrs": [0.003],
        "last_epoch": step,
        "_step_count": step + 1,
        "_last_lr": [0.003],
        "_get_lr_called_within_step": False,
        "lr_lambdas": [None],
    }
    state_file.write_text(json.dumps(state))
    meta = json.loads((ckpt / checkpoint.META).read_text())
    (ckpt / checkpoint.META).write_text(json.dumps({**meta, "format": 2}))
    _rehash(ckpt)


@pytest.mark.e2e
def test_a_format_2_checkpoint_resumes_exactly_like_the_current_format(run_dir, tmp_path):
    """Checkpoints from before format 3 resume: their scheduler state is ignored, the learning rate follows from
    the step, and the run continues exactly as from the same checkpoint in the current format."""
    old = tmp_path / "old"
    shutil.copytree(run_dir, old)
    config = old / "config.yaml"
    config.write_text(config.read_text().replace(str(run_dir), str(old)))
    _as_format_2(old / "checkpoints" / "step-0000006")
    assert checkpoint.verify(old / "checkpoints" / "step-0000006") is None
    for folder in (run_dir, old):
        done = run(train_command(folder / "config.yaml", "--resume", "auto", "--max-steps", "8"))
        assert done.returncode == 0, done.stderr[-3000:]
    steps = [
        {m["step"]: (m["train/loss"], m["lr"]) for m in metrics(folder) if "train/loss" in m}
        for folder in (run_dir, old)
    ]
    assert steps[0] == steps[1] and {7, 8} <= set(steps[0])
    new_weights, old_weights = (weights(f / "checkpoints" / "step-0000008") for f in (run_dir, old))
    assert all(torch.equal(new_weights[k], old_weights[k]) for k in new_weights)
    assert json.loads((old / "checkpoints" / "step-0000008" / checkpoint.META).read_text())["format"] == 3


def test_a_checkpoint_of_an_unknown_format_is_refused_with_the_reason(run_dir):
    newest = run_dir / "checkpoints" / "step-0000006"
    meta = json.loads((newest / checkpoint.META).read_text())
    (newest / checkpoint.META).write_text(json.dumps({**meta, "format": 1}))
    with pytest.raises(CheckpointError, match=r"checkpoint.json is of format 1, not one of \(2, 3\)"):
        checkpoint.resolve(run_dir, str(newest))


@pytest.mark.e2e
def test_rollback_moves_the_newer_checkpoints_aside(tiny_config, tmp_path):
    run_dir = tmp_path / "run"
    first = run(train_command(tiny_config, "--max-steps", "9", "--checkpoint-every", "3"))
    assert first.returncode == 0, first.stderr[-3000:]
    assert train_state(run_dir / "checkpoints" / "best")["step"] == 9  # the final evaluation
    older = run_dir / "checkpoints" / "step-0000006"
    back = run(train_command(tiny_config, "--resume", str(older), "--max-steps", "8", "--checkpoint-every", "1"))
    assert back.returncode == 0, back.stderr[-3000:]
    assert "moved the newer checkpoints step-0000009, best to" in back.stderr
    (abandoned,) = (run_dir / "checkpoints").glob("abandoned-*")
    assert sorted(p.name for p in abandoned.iterdir()) == ["best", "step-0000009"]
    assert [p.name for p in checkpoint.step_checkpoints(run_dir)] == ["step-0000007", "step-0000008"]
    assert train_state(run_dir / "checkpoints" / "best")["step"] == 8  # chosen again on this branch
    again = run(train_command(tiny_config, "--resume", "auto", "--max-steps", "10"))
    assert again.returncode == 0, again.stderr[-3000:]
    assert [m["step"] for m in metrics(run_dir) if "event/start" in m] == [0, 6, 8]


def test_best_keeps_its_metric_when_the_last_evaluation_falls_on_a_saved_step(tiny_config, tmp_path):
    """--max-steps a multiple of checkpoint.every_steps (a chunked job): step-10 is saved in the loop, then the
    final evaluation at step 10 makes it `best`; both keep that metric, so a later, worse evaluation after a resume
    does not replace it."""
    cfg = load_config(tiny_config, ["train.max_steps=10", "checkpoint.every_steps=5"])
    trainer.Trainer(cfg, source=str(tiny_config)).fit()
    run_dir = tmp_path / "run"
    (val,) = [m["val/accuracy"] for m in metrics(run_dir) if "val/accuracy" in m]  # the final evaluation only
    for name in ("step-0000010", "best"):
        state = train_state(run_dir / "checkpoints" / name)
        assert (state["best_metric"], state["best_step"]) == (val, 10), name


class _Killed(BaseException):
    """Stands for SIGKILL in the middle of a deletion."""


def test_a_kill_while_pruning_leaves_no_half_deleted_checkpoint(tiny_config, tmp_path, monkeypatch, caplog):
    real = shutil.rmtree

    def dying_rmtree(path, *args, **kwargs):
        path = Path(path)
        if path.is_dir() and re.match(r"^(\.trash-)?step-", path.name):
            next(path.iterdir()).unlink()  # part of the directory is gone ...
            raise _Killed()  # ... when the process dies
        return real(path, *args, **kwargs)

    monkeypatch.setattr(checkpoint.shutil, "rmtree", dying_rmtree)
    cfg = load_config(tiny_config, ["train.max_steps=12", "checkpoint.every_steps=3"])
    with pytest.raises(_Killed):
        trainer.Trainer(cfg, source=str(tiny_config)).fit()  # keep_last 2: the third save prunes step-3
    monkeypatch.setattr(checkpoint.shutil, "rmtree", real)
    run_dir = tmp_path / "run"
    for step_dir in (run_dir / "checkpoints").glob("step-*"):
        assert checkpoint.verify(step_dir) is None, step_dir
    caplog.clear()
    cfg = load_config(tiny_config, ["train.max_steps=12", "checkpoint.every_steps=3"])
    trainer.Trainer(cfg, source=str(tiny_config)).fit()
    assert "unusable" not in caplog.text
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["best", "step-0000009", "step-0000012"]


def test_a_kill_while_replacing_best_keeps_a_best(run_dir):
    """_replace renames best to .old-best, then .tmp-best to best: a kill between the two renames."""
    root = run_dir / "checkpoints"
    shutil.copytree(root / "step-0000003", root / ".old-best")
    (root / "best").rename(root / ".tmp-best")
    assert checkpoint.resolve(run_dir, "best") == root / "best"
    assert train_state(root / "best")["step"] == 6  # the new best, complete before the kill
    assert not (root / ".tmp-best").exists()


@pytest.mark.e2e
def test_unusable_checkpoints_are_moved_aside_never_deleted(run_dir):
    """Only unusable checkpoints (here: the older, pickled format): --resume none refuses, --resume auto starts
    afresh and keeps them in abandoned-<time>/ instead of letting retention delete them."""
    for path in (run_dir / "checkpoints").iterdir():
        (path / checkpoint.META).unlink()
    refused = run(train_command(run_dir / "config.yaml", "--resume", "none", "--max-steps", "2"))
    assert refused.returncode == 2 and "already holds checkpoints" in refused.stderr
    fresh = run(train_command(run_dir / "config.yaml", "--resume", "auto", "--max-steps", "4"))
    assert fresh.returncode == 0, fresh.stderr[-3000:]
    assert [m["step"] for m in metrics(run_dir) if "event/start" in m][-1] == 0
    (abandoned,) = (run_dir / "checkpoints").glob("abandoned-*")
    assert sorted(p.name for p in abandoned.iterdir()) == ["best", "step-0000003", "step-0000006"]
