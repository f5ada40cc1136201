"""Config schema: YAML loading, overrides with type coercion, and errors that name key and file."""

from pathlib import Path

import pytest
import yaml

from capsdist.config import Config, config_dict, config_from_dict, load_config, save_config
from capsdist.errors import ConfigError

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "run.yaml"
    path.write_text(text)
    return path


@pytest.mark.parametrize("name", ["full", "small", "fashion-mnist", "quickstart"])
def test_shipped_configs_load(name):
    cfg = load_config(CONFIGS / f"{name}.yaml")
    assert cfg.run_dir == f"runs/{name}"


def test_full_config_follows_the_paper():
    cfg = load_config(CONFIGS / "full.yaml")
    assert (cfg.model.size, cfg.model.iterations, cfg.loss.name) == ("full", 3, "spread_loss")
    assert cfg.data.dataset == "smallnorb" and cfg.optim.lr_decay_rate > 0


def test_yaml_values_and_overrides_are_coerced(tmp_path):
    path = write(tmp_path, "optim:\n  lr: 3e-3\n  lr_decay_steps: 2000.0\nlogging:\n  wandb:\n    tags: [a]\n")
    cfg = load_config(path, ["optim.lr=1e-2", "train.compile=yes", "logging.wandb.tags=x,y",
                             "train.batch_size=32", "model.alpha=0"])
    assert cfg.optim.lr == pytest.approx(1e-2) and isinstance(cfg.optim.lr, float)
    assert cfg.optim.lr_decay_steps == 2000 and isinstance(cfg.optim.lr_decay_steps, int)
    assert cfg.train.compile is True and cfg.logging.wandb.tags == ["x", "y"]
    assert cfg.train.batch_size == 32 and cfg.model.alpha == 0.0
    assert load_config(path, ["logging.wandb.tags=[p, q]"]).logging.wandb.tags == ["p", "q"]


@pytest.mark.parametrize("text, override, words", [
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
])
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
    assert config_dict(Config())["optim"]["lr"] == pytest.approx(3e-3)
