"""Learning curves read from a run directory and drawn to a PNG."""

from __future__ import annotations

import json

import pytest
import yaml

from capsdist.experiments.curves import plot_curves, read_curves
from capsdist.core.errors import ConfigError


def _run(tmp_path, batch=32):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text(yaml.safe_dump({"train": {"batch_size": batch}}))
    lines = [{"step": s, "train/loss": 1.0 / s, "train/accuracy": 0.5} for s in range(1, 5)]
    lines += [{"step": 4, "val/accuracy": 0.6, "val/loss": 0.3}, {"step": 4, "test/accuracy": 0.55}]
    lines += [{"step": 4, "val/accuracy": 0.7}]  # a resumed run redid step 4: the last record wins
    text = "\n".join(json.dumps(line) for line in lines) + '\n{"step": 5, "train/lo'  # cut short by a kill
    (run / "metrics.jsonl").write_text(text)
    return run


def test_steps_become_images_seen_and_the_last_record_of_a_step_wins(tmp_path):
    curves = read_curves(_run(tmp_path), "caps", smooth_steps=2)
    assert curves.label == "caps"
    assert curves.val_accuracy == [(128, 0.7)] and curves.test_accuracy == [(128, 0.55)]
    assert curves.train_loss == [(64, (1.0 + 0.5) / 2), (128, (1 / 3 + 1 / 4) / 2)]  # means over 2 steps


def test_plot_writes_a_png(tmp_path):
    out = plot_curves([read_curves(_run(tmp_path))], tmp_path / "plots" / "curves.png", title="t")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert list(out.parent.iterdir()) == [out]  # no temporary file left behind


def test_a_directory_that_is_no_run_is_named(tmp_path):
    with pytest.raises(ConfigError, match="not a run directory"):
        read_curves(tmp_path)


def test_training_time_sums_the_logged_step_times(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text(yaml.safe_dump({"train": {"batch_size": 16}}))
    lines = [{"step": 2, "perf/step_time_s": 0.5}, {"step": 4, "perf/step_time_s": 0.25}]  # a log every 2 steps
    lines += [{"step": s, "train/loss": 1.0, "train/accuracy": 0.5} for s in range(1, 6)]
    lines += [{"step": 3, "val/accuracy": 0.6}, {"step": 5, "val/accuracy": 0.7}]
    (run / "metrics.jsonl").write_text("\n".join(json.dumps(line) for line in lines))
    curves = read_curves(run, x="time", smooth_steps=1)
    # steps 1-2 at 0.5 s, 3-4 at 0.25 s, step 5 continues at the last rate
    assert curves.val_accuracy == [(pytest.approx(1.25), 0.6), (pytest.approx(1.75), 0.7)]
    assert [t for t, _ in curves.train_loss] == pytest.approx([0.5, 1.0, 1.25, 1.5, 1.75])
    assert read_curves(run).val_accuracy == [(48, 0.6), (80, 0.7)]  # images seen, the default
    assert plot_curves([curves], tmp_path / "t.png", x="time").is_file()


def test_a_run_without_step_times_cannot_be_drawn_against_time(tmp_path):
    with pytest.raises(ConfigError, match="perf/step_time_s"):
        read_curves(_run(tmp_path), x="time")
