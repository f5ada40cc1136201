"""launch/experiment.py end to end on tiny runs: the viewpoint pipeline on a smallNORB-format fixture (train both
models, evaluate every checkpoint on familiar and novel viewpoints, match, write table and plot) and the adversarial
experiment (JSON, Markdown, PNG, W&B offline); the matching rule; mistakes a user can make are clear messages."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from capsdist.data import shards
from capsdist.data.plan import TRAIN_AZIMUTHS
from capsdist.experiments.viewpoints import Point, match
from fixtures import launch_script, make_norb_source, trust
from train_helpers import REPO, TEST, TINY, run, train_command

EXPERIMENT = [sys.executable, str(REPO / "launch" / "experiment.py")]
NORB_TRAIN, NORB_TEST = 90, 45  # azimuth split: 30 training images (27 train + 3 val), 15 familiar + 30 novel test
NORB_STEPS = 3  # 27 training images // batch 8, per epoch


def write_config(path: Path, **sections) -> Path:
    """TINY with `sections` merged in (section -> {key: value}), as a YAML file."""
    cfg = json.loads(json.dumps(TINY))
    for section, values in sections.items():
        cfg.setdefault(section, {}).update(values)
    path.write_text(yaml.safe_dump(cfg))
    return path


def png(path: Path) -> bool:
    return path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def norb_shards(tmp_path_factory) -> tuple[Path, dict]:
    """A prepared smallNORB-format fixture: (shards directory, the raw arrays)."""
    root = tmp_path_factory.mktemp("norb-exp")
    raw = make_norb_source(root / "raw", NORB_TRAIN, NORB_TEST, gz=False)
    with pytest.MonkeyPatch.context() as mp:
        trust(mp, "smallnorb", root / "raw")
        shards.prepare("smallnorb", root / "shards", source=root / "raw", shard_size=20, log=lambda _: None)
    return root / "shards", raw


@pytest.mark.e2e
def test_viewpoints_end_to_end_on_a_smallnorb_fixture(norb_shards, tmp_path):
    path, raw = norb_shards
    config = write_config(
        tmp_path / "norb.yaml",
        data={"dataset": "smallnorb", "shards": str(path)},
        train={"batch_size": 8, "epochs": 3},
        eval={"batch_size": 16},
        checkpoint={"every_steps": 1},
    )
    out = tmp_path / "out"
    result = run(
        EXPERIMENT
        + [
            "viewpoints",
            "--config",
            str(config),
            "--split",
            "azimuth",
            "--out",
            str(out),
            "--cnn-set",
            "model.size=cnn-small",
        ],
        timeout=400,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    table = json.loads((out / "viewpoints-azimuth.json").read_text())
    assert png(out / "viewpoints-azimuth.png")
    assert "familiar accuracy" in (out / "viewpoints-azimuth.md").read_text()

    # familiar / novel: the test images at the training azimuths and at the others, from the raw metadata
    familiar = int(np.isin(raw["test"]["info"][:, 2], list(TRAIN_AZIMUTHS)).sum())
    assert table["split"] == "azimuth" and table["images"] == {"familiar": familiar, "novel": NORB_TEST - familiar}
    assert 0 < familiar < NORB_TEST
    models = {m["label"]: m for m in table["models"]}
    assert set(models) == {"capsules", "cnn"} and models["cnn"]["model"] == "cnn-small"
    for m in models.values():  # every checkpoint kept and evaluated, step 1 to the end of 3 epochs
        assert [p["step"] for p in m["checkpoints"]] == list(range(1, 3 * NORB_STEPS + 1))
        assert m["last"] == m["checkpoints"][-1]
    # the matching, recomputed: the reference at its last checkpoint, the other at its closest familiar accuracy
    reference = models[table["reference"]]
    other = next(m for m in models.values() if m is not reference)
    assert reference["last"]["familiar"] <= other["last"]["familiar"] and reference["matched"] == reference["last"]
    gaps = [abs(p["familiar"] - reference["last"]["familiar"]) for p in other["checkpoints"]]
    assert other["matched"] == other["checkpoints"][int(np.argmin(gaps))]

    # launch/evaluate.py on the familiar subset agrees with the experiment's figure for that checkpoint
    chosen = other["matched"]
    evaluated = run(
        [
            sys.executable,
            str(REPO / "launch" / "evaluate.py"),
            "--run-dir",
            other["run_dir"],
            "--checkpoint",
            chosen["checkpoint"],
            "--split",
            "test_familiar",
        ]
    )
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    written = json.loads(
        (Path(other["run_dir"]) / f"eval-{Path(chosen['checkpoint']).name}-test_familiar.json").read_text()
    )
    assert written["accuracy"] == chosen["familiar"] and written["count"] == familiar

    # the same two runs compared again from their directories give the same table
    again = run(
        EXPERIMENT
        + [
            "viewpoints",
            "--run-dir",
            f"{out / 'capsules'}=capsules",
            "--run-dir",
            f"{out / 'cnn'}=cnn",
            "--split",
            "azimuth",
            "--out",
            str(tmp_path / "again"),
        ]
    )
    assert again.returncode == 0, again.stderr[-3000:]
    assert json.loads((tmp_path / "again" / "viewpoints-azimuth.json").read_text()) == table


def test_matching_takes_the_less_accurate_run_at_its_end_and_the_other_where_it_matches():
    def curve(*familiar):
        return [Point(step, f"s{step}", acc, acc - 0.2) for step, acc in enumerate(familiar, 1)]

    caps, cnn = curve(0.5, 0.7, 0.8), curve(0.6, 0.79, 0.81, 0.95)
    reference, chosen = match({"capsules": caps, "cnn": cnn})
    assert reference == "capsules" and chosen == {"capsules": caps[-1], "cnn": cnn[1]}
    reference, chosen = match({"a": curve(0.875, 0.625), "b": curve(0.25, 0.75, 0.5, 0.75)})  # ties: the earliest
    assert reference == "a" and chosen["b"].step == 2


@pytest.fixture(scope="module")
def tiny_runs(tiny_shards, tmp_path_factory) -> dict[str, Path]:
    """Two tiny Fashion-MNIST-format runs of 6 steps: a capsule net and cnn-small."""
    root = tmp_path_factory.mktemp("adv-runs")
    runs = {}
    for name, model in (("caps", {}), ("cnn", {"size": "cnn-small"})):
        config = write_config(
            root / f"{name}.yaml",
            data={"shards": str(tiny_shards)},
            model=model,
            loss={"name": "categorical_crossentropy"} if model else {},
        )
        runs[name] = root / name
        trained = run(train_command(config, "--max-steps", "6", "--run-dir", str(runs[name])))
        assert trained.returncode == 0, trained.stderr[-3000:]
    return runs


@pytest.mark.e2e
def test_adversarial_end_to_end_with_wandb_offline(tiny_runs, tmp_path):
    out = tmp_path / "out"
    result = run(
        EXPERIMENT
        + [
            "adversarial",
            "--run-dir",
            f"{tiny_runs['caps']}=capsules",
            "--run-dir",
            f"{tiny_runs['cnn']}=cnn",
            "--attack",
            "bim",
            "--targeted",
            "--steps",
            "3",
            "--eps",
            "0",
            "0.1",
            "--out",
            str(out),
            "--set",
            "logging.wandb.mode=offline",
        ]
    )
    assert result.returncode == 0, result.stderr[-3000:]
    table = json.loads((out / "adversarial-bim-targeted.json").read_text())
    assert png(out / "adversarial-bim-targeted.png")
    assert "capsules accuracy" in (out / "adversarial-bim-targeted.md").read_text()
    assert (table["attack"], table["targeted"], table["eps"], table["bim_steps"]) == ("bim", True, [0.0, 0.1], 3)
    assert table["images"] == {"split": "test", "first": None, "count": TEST}
    for m in table["models"]:
        assert m["accuracy"][0] == m["clean_accuracy"] and len(m["success_rate"]) == 2
        evaluated = run([sys.executable, str(REPO / "launch" / "evaluate.py"), "--run-dir", m["run_dir"]])
        assert evaluated.returncode == 0, evaluated.stderr[-3000:]
        assert m["clean_accuracy"] == json.loads((Path(m["run_dir"]) / "eval-best-test.json").read_text())["accuracy"]
    assert "wandb sync" in result.stdout
    (media,) = (out / "wandb").glob("offline-run-*/files/media/table/bim-targeted")  # line plots are W&B tables
    (accuracy,) = media.glob("accuracy_table_*.table.json")
    plotted = json.loads(accuracy.read_text())
    assert plotted["columns"] == ["step", "lineKey", "lineVal"]  # x = epsilon, one line per model
    assert plotted["data"] == [
        [eps, m["label"], acc] for m in table["models"] for eps, acc in zip(table["eps"], m["accuracy"])
    ]
    assert len(list(media.glob("success_rate_table_*.table.json"))) == 1


@pytest.mark.e2e
def test_adversarial_untargeted_fgsm_on_the_first_images_and_chosen_checkpoints(tiny_runs, tmp_path):
    step5 = tiny_runs["caps"] / "checkpoints" / "step-0000005"
    result = run(
        EXPERIMENT
        + [
            "adversarial",
            "--run-dir",
            str(tiny_runs["caps"]),
            "--checkpoint",
            "best",
            "--run-dir",
            f"{tiny_runs['caps']}=caps at step 5",
            "--checkpoint",
            str(step5),
            "--attack",
            "fgsm",
            "--untargeted",
            "--eps",
            "0",
            "0.3",
            "--limit",
            "20",
            "--out",
            str(tmp_path),
            "--set",
            "logging.wandb.mode=disabled",
        ]
    )
    assert result.returncode == 0, result.stderr[-3000:]
    best, early = json.loads((tmp_path / "adversarial-fgsm-untargeted.json").read_text())["models"]
    assert (best["label"], best["step"], early["label"], early["step"]) == ("caps", 6, "caps at step 5", 5)
    assert best["count"] == early["count"] == 20 and best["success_rate"][0] == 0.0
    assert not (tmp_path / "wandb").exists()


@pytest.mark.parametrize(
    "args,message",
    [
        (["--attack", "fgsm", "--untargeted", "--eps", "-0.1"], "eps [-0.1]: give one or more epsilons in [0, 1]"),
        (["--attack", "fgsm", "--untargeted", "--eps", "0.1", "--steps", "5"], "--steps sets BIM's iterations"),
        (["--attack", "bim", "--untargeted", "--eps", "0.1", "--limit", "0"], "--limit 0: attack at least 1 image"),
        (
            ["--attack", "bim", "--targeted", "--eps", "0.1", "--checkpoint", "best", "--checkpoint", "latest"],
            "2 checkpoints for 1 runs: give one for all, or one per run",
        ),
    ],
)
def test_adversarial_arguments_a_user_can_get_wrong(tmp_path, capsys, args, message):
    assert (
        launch_script("experiment").main(["adversarial", "--run-dir", str(tmp_path), "--out", str(tmp_path), *args])
        == 2
    )
    assert message in capsys.readouterr().err


def test_runs_on_other_images_or_viewpoints_are_refused(tiny_runs, norb_shards, tmp_path, capsys):
    other = tmp_path / "other"
    other.mkdir()
    cfg = yaml.safe_load((tiny_runs["cnn"] / "config.yaml").read_text())
    cfg["data"].update(dataset="smallnorb", shards=str(norb_shards[0]), viewpoint="elevation")
    (other / "config.yaml").write_text(yaml.safe_dump(cfg))
    experiment = launch_script("experiment").main
    assert (
        experiment(
            [
                "adversarial",
                "--run-dir",
                str(tiny_runs["caps"]),
                "--run-dir",
                str(other),
                "--attack",
                "fgsm",
                "--untargeted",
                "--eps",
                "0.1",
                "--out",
                str(tmp_path),
            ]
        )
        == 2
    )
    assert "test on different images" in capsys.readouterr().err
    assert (
        experiment(["viewpoints", "--run-dir", str(tiny_runs["caps"]), "--run-dir", str(other), "--out", str(tmp_path)])
        == 2
    )
    assert f"{tiny_runs['caps']}: trained with data.viewpoint: none" in capsys.readouterr().err
    assert experiment(["viewpoints", "--run-dir", str(other), "--out", str(tmp_path), "--split", "azimuth"]) == 2
    assert "the viewpoint comparison takes two runs" in capsys.readouterr().err
    assert experiment(["viewpoints", "--config", str(tmp_path / "none.yaml"), "--out", str(tmp_path)]) == 2
    assert "needs --split azimuth or elevation" in capsys.readouterr().err
