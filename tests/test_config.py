"""Config schema: YAML loading, overrides with type coercion, and errors that name key and file."""

import dataclasses
from pathlib import Path

import pytest
import yaml

from capsdist.config import Config, changed_keys, config_dict, config_from_dict, load_config, save_config
from capsdist.core.errors import ConfigError
from capsdist.model import PAPER

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "run.yaml"
    path.write_text(text)
    return path


@pytest.mark.parametrize("name", ["full", "small", "paper-full", "paper-small", "fashion-mnist", "quickstart"])
def test_shipped_configs_load(name):
    cfg = load_config(CONFIGS / f"{name}.yaml")
    assert cfg.run_dir == f"runs/{name}"


@pytest.mark.parametrize("size", ["full", "small"])
def test_paper_configs_pin_the_papers_setup_whatever_the_defaults(size):
    """paper-*.yaml set every recipe key themselves, so they stay the paper's setup when the defaults change."""
    cfg = load_config(CONFIGS / f"paper-{size}.yaml")
    assert (cfg.model.size, cfg.model.iterations, cfg.model.alpha, cfg.model.final_lambda) == (size, 3, 0.0, 0.01)
    assert cfg.model.estep_temperature == 1.0
    for setting in dataclasses.fields(PAPER):  # every routing key, those added later included
        assert getattr(cfg.model, setting.name) == getattr(PAPER, setting.name), setting.name
    paper_images = 20000 * 64  # the paper's 20000 steps at batch 64
    assert (cfg.loss.name, cfg.loss.margin_schedule, cfg.loss.max_margin_images) == (
        "spread_loss",
        "linear",
        paper_images,
    )
    assert cfg.optim.lr_decay_images == paper_images
    assert (cfg.optim.name, cfg.optim.lr, cfg.optim.schedule, cfg.optim.lr_decay_rate) == (
        "adam",
        3e-3,
        "exponential",
        0.96,
    )
    assert (cfg.data.dataset, cfg.train.batch_size) == ("smallnorb", 64)
    text = (CONFIGS / f"paper-{size}.yaml").read_text()
    for key in (
        "iterations:",
        "estep_temperature:",
        "alpha:",
        "final_lambda:",
        "variance_floor:",
        "lr:",
        "schedule:",
        "margin_schedule:",
        "max_margin_images:",
        "lr_decay_images:",
        "batch_size:",
    ):
        assert key in text, key


def test_yaml_values_and_overrides_are_coerced(tmp_path):
    path = write(tmp_path, "optim:\n  lr: 3e-3\n  lr_decay_images: 2000.0\nlogging:\n  wandb:\n    tags: [a]\n")
    cfg = load_config(
        path, ["optim.lr=1e-2", "train.compile=yes", "logging.wandb.tags=x,y", "train.batch_size=32", "model.alpha=0"]
    )
    assert cfg.optim.lr == pytest.approx(1e-2) and isinstance(cfg.optim.lr, float)
    assert cfg.optim.lr_decay_images == 2000 and isinstance(cfg.optim.lr_decay_images, int)
    assert cfg.train.compile is True and cfg.logging.wandb.tags == ["x", "y"]
    assert cfg.train.batch_size == 32 and cfg.model.alpha == 0.0
    assert load_config(path, ["logging.wandb.tags=[p, q]"]).logging.wandb.tags == ["p", "q"]


@pytest.mark.parametrize(
    "text, override, words",
    [
        ("optim:\n  learning_rate: 0.1\n", None, ["run.yaml", "optim.learning_rate", "unknown key"]),
        ("trian:\n  epochs: 1\n", None, ["run.yaml", "trian", "unknown key"]),
        ("train:\n  batch_size: big\n", None, ["run.yaml", "train.batch_size", "integer"]),
        ("train:\n  compile: 1\n", None, ["train.compile", "true or false"]),
        ("model:\n  size: huge\n", None, ["model.size", "full", "small"]),
        ("optim:\n  lr: -1\n", None, ["run.yaml", "optim.lr", "> 0"]),
        ("model:\n  alpha: 2\n", None, ["model.alpha", "<= 1"]),
        ("model: 3\n", None, ["run.yaml", "model", "mapping"]),
        ("data:\n  dataset: fashion-mnist\n  val_strategy: loio\n", None, ["data.val_strategy", "smallnorb"]),
        ("", "optim.lr=fast", ["--set", "optim.lr", "number"]),
        ("", "train.nope=1", ["--set", "train.nope", "unknown key"]),
        ("", "train.epochs", ["--set", "key=value"]),
        ("", "train.epochs=0", ["run.yaml", "train.epochs", ">= 1"]),
    ],
)
def test_errors_name_key_and_file(tmp_path, text, override, words):
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as err:
        load_config(path, [override] if override else [])
    for word in words:
        assert word in str(err.value)


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "absent.yaml")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(write(tmp_path, "train: [\n"))


def test_resolved_config_round_trips_and_user_file_is_untouched(tmp_path):
    path = write(tmp_path, "train:\n  epochs: 2\n")
    before = path.read_text()
    cfg = load_config(path, ["optim.lr=0.5"])
    save_config(cfg, tmp_path / "resolved.yaml")
    assert path.read_text() == before
    again = config_from_dict(yaml.safe_load((tmp_path / "resolved.yaml").read_text()), "resolved.yaml")
    assert config_dict(again) == config_dict(cfg)
    assert config_dict(Config())["optim"]["lr"] == pytest.approx(1e-2)


def test_changed_keys_names_each_changed_value_by_its_dotted_key(tmp_path):
    before = config_dict(Config())
    after = config_dict(load_config(write(tmp_path, "optim:\n  lr: 0.5\n"), ["logging.wandb.tags=[a]"]))
    assert changed_keys(before, after) == ["logging.wandb.tags", "optim.lr", "run_dir"]  # run_dir: from the file
    assert changed_keys({"a": {"b": 1}}, {"a": 2, "c": 3}) == ["a", "c"]


def test_learning_rate_schedules_are_functions_of_the_images_seen():
    import math

    from capsdist.config import OptimConfig
    from capsdist.train.optim import lr_factor

    paper = OptimConfig(schedule="exponential", lr_decay_rate=0.96, lr_decay_images=20000)
    assert lr_factor(0, paper, 100) == 1.0
    assert math.isclose(lr_factor(40000, paper, 100), 0.96**2)  # ignores the run length
    assert lr_factor(5, OptimConfig(schedule="exponential", lr_decay_rate=0.0), 100) == 1.0  # decay disabled
    cosine = OptimConfig(schedule="cosine", final_lr_ratio=0.1)
    assert lr_factor(0, cosine, 1000) == 1.0
    assert math.isclose(lr_factor(500, cosine, 1000), 0.1 + 0.9 * 0.5)  # half way: half way down
    assert math.isclose(lr_factor(1000, cosine, 1000), 0.1) and math.isclose(lr_factor(5000, cosine, 1000), 0.1)
    steps = [lr_factor(s, cosine, 1000) for s in range(0, 1001, 50)]
    assert all(a > b for a, b in zip(steps, steps[1:]))  # strictly decreasing over the run
