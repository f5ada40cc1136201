"""Run configuration: a typed dataclass schema, YAML loading, `a.b=c` overrides and validation.

A config is data. `load_config(path, overrides)` reads a YAML file, applies command-line
overrides (`optim.lr=1e-3`, `logging.wandb.tags=[a,b]`), coerces every value to the type its
field declares and checks every constraint, so a bad key, type or value stops the run with a
`ConfigError` that names the key and the file before any work starts. The user's file is
never written; `save_config` writes the resolved config into the run directory instead.
Every key is documented in configs/README.md.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from capsdist.data import DATASETS, DataOptions
from capsdist.core.errors import ConfigError
from capsdist.core.files import write_atomic
from capsdist.model import INITS, LOSSES, MARGIN_SCHEDULES, MODEL_SIZES, RECIPE, ROUTING_IMPLS


def _num(default: float, lo: float | None = None, hi: float | None = None, *, open_lo: bool = False):
    """A numeric field with bounds checked by `validate` (lo <= v <= hi, or lo < v with open_lo)."""
    return field(default=default, metadata={"lo": lo, "hi": hi, "open_lo": open_lo})


# The defaults of the routing keys are capsdist's recipe (capsdist.model.RECIPE; the paper's are model.PAPER),
# those of the data keys the loaders' own (capsdist.data.DataOptions): each value is written once, there.
_DATA = DataOptions(shards="")


@dataclass
class ModelConfig:
    size: Literal[MODEL_SIZES] = "small"  # capsules: full A=B=C=D=32, small A=64 B=8 C=D=16 (model.PRESETS);
    # CNN baselines: cnn (the paper's, 4.2M parameters), cnn-small (about small's size) (model.CNN_PRESETS)
    A: int = _num(0, 0)  # ReLU conv channels; 0 keeps the preset's value (tests use tiny widths)
    B: int = _num(0, 0)  # primary capsule types; 0 = preset
    C: int = _num(0, 0)  # ConvCaps1 capsule types; 0 = preset
    D: int = _num(0, 0)  # ConvCaps2 capsule types; 0 = preset
    iterations: int = _num(RECIPE.iterations, 1)  # EM routing iterations
    alpha: float = _num(RECIPE.alpha, 0.0, 1.0)  # moving average of poses across iterations
    coord_add: bool = True  # add scaled coordinates to class-capsule votes (paper)
    final_lambda: float = _num(RECIPE.final_lambda, 0.0, open_lo=True)  # inverse temperature at the last iteration
    variance_floor: float = _num(RECIPE.variance_floor, 0.0, open_lo=True)  # added to every parent variance
    estep_temperature: float = _num(RECIPE.estep_temperature, 0.0, open_lo=True)  # E-step log-likelihoods / T
    class_lambda_scale: float = _num(RECIPE.class_lambda_scale, 0.0, open_lo=True)  # class layer: final_lambda * this
    beta_a_scale: float = _num(RECIPE.beta_a_scale, 0.0, open_lo=True)  # routing sees beta_a * this
    init: Literal[INITS] = "gritzman"  # weight initialisation (capsnet.INITS)
    stem_convs: int = _num(0, 0)  # 3x3 ReLU convolutions after the first one, A channels each (the paper: 0)
    stem_norm: bool = False  # BatchNorm after each stem convolution, before its ReLU (the paper: none)
    stem_pool: bool = False  # the first convolution at stride 1, then 2x2 max-pooling (the paper: stride 2)
    routing_checkpoint: bool = False  # route images in chunks, recompute in backward: less memory
    routing_impl: Literal[ROUTING_IMPLS] = "auto"  # torch (reference) | triton (CUDA) | c (CPU) | auto (layers.py)


@dataclass
class DataConfig:
    dataset: str = "smallnorb"  # one of capsdist.data.DATASETS (the TensorFlow implementation's dataset_name)
    shards: str = ""  # directory or URL prefix with manifest.json; "" = shards/<dataset>
    val_strategy: Literal["random", "loio", "test"] = _DATA.val_strategy  # test = selection on the test set
    val_fraction: float = _num(_DATA.val_fraction, 0.0, 1.0, open_lo=True)  # held-out fraction for random
    viewpoint: Literal["none", "azimuth", "elevation"] = _DATA.viewpoint  # smallNORB novel-viewpoint split
    channels: Literal["both", "left"] = _DATA.channels  # smallNORB stereo channels
    augment: bool = _DATA.augment  # training augmentation
    pad_crop: int = _num(_DATA.pad_crop, 0)  # MNIST-likes: pad by N then random-crop back
    # loader workers per process; auto (not DataOptions' count): from the cores and processes (capsdist.core.threads)
    num_workers: int | Literal["auto"] = _num("auto", 0)
    shuffle_buffer: int = _num(_DATA.shuffle_buffer, 1)  # WebDataset shuffle buffer (samples)
    skip_corrupt: bool = _DATA.skip_corrupt  # skip corrupt samples instead of failing
    max_skipped_fraction: float = _num(0.01, 0.0, 1.0)  # skip_corrupt: stop when an epoch loses more than this
    read_timeout_s: float = _num(_DATA.read_timeout_s, 0.0, open_lo=True)  # URL shards: no data this long = an error
    prepare: Literal["auto", "never"] = "auto"  # auto: rank 0 prepares missing shards


@dataclass
class OptimConfig:
    name: Literal["adam", "adamw"] = "adam"  # the TensorFlow implementation's optimizer
    lr: float = _num(1e-2, 0.0, open_lo=True)  # learning rate at step 0 (paper 3e-3; 1e-2 learns faster)
    weight_decay: float = _num(0.0, 0.0)  # L2 (adam) or decoupled (adamw) decay
    schedule: Literal["exponential", "cosine"] = "cosine"  # lr schedule over images seen (paper: exponential)
    lr_decay_rate: float = 0.96  # exponential: decay factor per lr_decay_images; <= 0 disables decay
    lr_decay_images: int = _num(1_280_000, 1)  # exponential: images per decay factor (paper: 20000 steps of 64)
    final_lr_ratio: float = _num(0.01, 0.0, 1.0)  # cosine: lr at the last step of train.epochs, as a fraction of lr
    grad_clip: float = _num(0.0, 0.0)  # max global gradient norm; 0 disables


@dataclass
class LossConfig:
    name: Literal[LOSSES] = "spread_loss"
    margin_schedule: Literal[MARGIN_SCHEDULES] = "linear"  # linear 0.2->0.9 (paper), sigmoid (authors)
    max_margin_images: int = _num(1_280_000, 1)  # images seen when the margin reaches its maximum (20000 steps of 64)


@dataclass
class TrainConfig:
    batch_size: int = _num(64, 1)  # global batch; divided evenly over processes
    epochs: int = _num(100, 1)  # passes over the training split
    max_steps: int = _num(0, 0)  # stop after this many global steps; 0 = run all epochs
    seed: int = _num(0, 0, 2**32 - 1)  # model init and data order (numpy seeds are 32-bit)
    mixed_precision: Literal["no", "bf16", "fp16"] = "no"  # via Accelerate; routing stays float32
    compile: bool = False  # torch.compile the model
    max_nonfinite: int = _num(5, 1)  # consecutive non-finite losses that stop the run
    collective_timeout_s: int = _num(600, 1)  # a rank waiting longer than this for the others stops the run


@dataclass
class EvalConfig:
    every_steps: int = _num(0, 0)  # evaluate every N global steps; 0 = at each epoch end only
    test: bool = True  # also evaluate on the test split
    batch_size: int = _num(0, 0)  # global eval batch; 0 = train.batch_size
    misclassified_images: int = _num(8, 0)  # misclassified samples logged per evaluation


@dataclass
class CheckpointConfig:
    every_steps: int = _num(500, 0)  # save every N global steps (0 = only at epoch ends and on exit)
    keep_last: int = _num(3, 1)  # step checkpoints kept (best is kept apart)
    best_metric: Literal["val_accuracy", "test_accuracy"] = "val_accuracy"  # what `best` maximises


@dataclass
class WandbConfig:
    project: str = "capsdist"
    entity: str = ""  # "" = your default entity
    name: str = ""  # "" = the run directory's name
    tags: list[str] = field(default_factory=list)
    mode: Literal["online", "offline", "disabled"] = "online"  # online without credentials -> offline; WANDB_MODE wins
    init_timeout_s: float = _num(30.0, 0.0, open_lo=True)  # online: wait this long for the server, then log offline


@dataclass
class LoggingConfig:
    every_steps: int = _num(10, 1)  # steps between throughput/health logs (loss goes to metrics.jsonl every step)
    health_warn_steps: int = _num(200, 1)  # warn when the class capsules stay all dead / all saturated this long
    wandb: WandbConfig = field(default_factory=WandbConfig)


@dataclass
class Config:
    run_dir: str = ""  # "" = runs/<config file stem>
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)

    @property
    def shards(self) -> str:
        """Shard location: data.shards, or shards/<dataset> when unset."""
        return self.data.shards or f"shards/{self.data.dataset}"


_TRUE = {"true", "yes", "on", "1"}
_FALSE = {"false", "no", "off", "0"}


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Return `value` as type `tp` (int, float, bool, str, list[str], Literal, a union of them) or raise
    ConfigError."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):  # the first alternative that takes the value
        errors = []
        for alternative in typing.get_args(tp):
            try:
                return _coerce(value, alternative, where)
            except ConfigError as err:
                errors.append(str(err).removeprefix(f"{where}: "))
        raise ConfigError(f"{where}: {'; or '.join(errors)}")
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            raise ConfigError(f"{where}: {value!r} is not one of {', '.join(map(str, choices))}")
        return value
    if origin is list:
        if isinstance(value, str):
            text = value.strip()
            value = yaml.safe_load(text) if text.startswith("[") else [v for v in text.split(",") if v]
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        (item_tp,) = typing.get_args(tp)
        return [_coerce(v, item_tp, where) for v in value]
    if tp is bool:
        if isinstance(value, str) and value.lower() in _TRUE | _FALSE:
            return value.lower() in _TRUE
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, str):
            try:
                value = int(value)
            except ValueError:
                pass
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):
            try:
                value = float(value)  # YAML 1.1 reads 3e-3 as a string
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ConfigError(f"{where}: expected a finite number, got {value!r}")
        return float(value)
    if tp is str:
        if value is None:
            return ""
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return str(value)
    raise AssertionError(f"unsupported config type {tp}")


# keys that counted global steps, and the keys that count images instead
RENAMED = {"lr_decay_steps": "lr_decay_images", "max_margin_steps": "max_margin_images"}


def _merge(obj: Any, values: dict, prefix: str, source: str) -> None:
    """Set the fields of dataclass `obj` from the nested dict `values` (keys checked, values coerced)."""
    if not isinstance(values, dict):
        raise ConfigError(f"{source}: {prefix.rstrip('.') or 'top level'} must be a mapping, got {values!r}")
    hints = typing.get_type_hints(type(obj))
    names = [f.name for f in dataclasses.fields(obj)]
    for key, value in values.items():
        where = f"{source}: {prefix}{key}"
        if key in RENAMED and RENAMED[key] in names:
            raise ConfigError(
                f"{where}: replaced by {prefix}{RENAMED[key]}: schedules count images seen, so that the batch size "
                f"does not change them; set it to the old value x train.batch_size (20000 steps at 64: 1280000)"
            )
        if key not in names:
            raise ConfigError(f"{where}: unknown key; known keys here: {', '.join(names)}")
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current):
            _merge(current, value if value is not None else {}, f"{prefix}{key}.", source)
        else:
            setattr(obj, key, _coerce(value, hints[key], where))


def _override(cfg: Config, item: str) -> None:
    """Apply one `a.b.c=value` override; the value is parsed as YAML text and coerced."""
    where = f"--set {item}"
    if "=" not in item:
        raise ConfigError(f"{where}: expected key=value, for example optim.lr=1e-3")
    key, text = item.split("=", 1)
    *path, leaf = key.strip().split(".")
    nested: dict = {leaf: text if text.strip() else None}
    for part in reversed(path):
        nested = {part: nested}
    _merge(cfg, nested, "", "--set")


def validate(cfg: Config, source: str) -> None:
    """Check numeric bounds and cross-field rules; raise ConfigError naming the key and `source`."""

    def walk(obj: Any, prefix: str) -> None:
        for f in dataclasses.fields(obj):
            value = getattr(obj, f.name)
            if dataclasses.is_dataclass(value):
                walk(value, f"{prefix}{f.name}.")
                continue
            if isinstance(value, str):  # a named choice of a numeric field ("auto")
                continue
            lo, hi, open_lo = f.metadata.get("lo"), f.metadata.get("hi"), f.metadata.get("open_lo")
            key = f"{source}: {prefix}{f.name}"
            if lo is not None and (value <= lo if open_lo else value < lo):
                raise ConfigError(f"{key}: {value} must be {'>' if open_lo else '>='} {lo}")
            if hi is not None and value > hi:
                raise ConfigError(f"{key}: {value} must be <= {hi}")

    walk(cfg, "")
    if cfg.data.dataset not in DATASETS:
        raise ConfigError(f"{source}: data.dataset: unknown dataset {cfg.data.dataset!r}; known: {', '.join(DATASETS)}")
    if cfg.data.val_strategy == "loio" and cfg.data.dataset != "smallnorb":
        raise ConfigError(f"{source}: data.val_strategy: loio (leave instance out) exists only for smallnorb")
    if cfg.data.viewpoint != "none" and cfg.data.dataset != "smallnorb":
        raise ConfigError(f"{source}: data.viewpoint: novel-viewpoint splits exist only for smallnorb")
    if cfg.checkpoint.best_metric == "test_accuracy" and not cfg.eval.test:
        raise ConfigError(f"{source}: checkpoint.best_metric: test_accuracy needs eval.test: true")


def load_config(path: str | Path, overrides: list[str] = ()) -> Config:
    """Read YAML `path`, apply `overrides` ("a.b=c"), validate, and return the typed Config."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        values = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from None
    cfg = config_from_dict(values, str(path), overrides)
    if not cfg.run_dir:
        cfg.run_dir = str(Path("runs") / path.stem)
    return cfg


def config_dict(cfg: Config) -> dict:
    """The config as a plain nested dict (for YAML, W&B and checkpoints)."""
    return dataclasses.asdict(cfg)


def changed_keys(before: dict, after: dict, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two nested config dicts."""
    keys = []
    for key in sorted(set(before) | set(after)):
        a, b = before.get(key), after.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            keys += changed_keys(a, b, f"{prefix}{key}.")
        elif a != b:
            keys.append(f"{prefix}{key}")
    return keys


def save_config(cfg: Config, path: str | Path) -> None:
    """Write the resolved config as YAML to `path` (in the run directory), atomically."""
    write_atomic(path, yaml.safe_dump(config_dict(cfg), sort_keys=False).encode())


def config_from_dict(values: dict, source: str, overrides: list[str] = ()) -> Config:
    """Build a validated Config from nested `values` read from `source`, then `overrides`."""
    cfg = Config()
    _merge(cfg, values, "", source)
    for item in overrides:
        _override(cfg, item)
    validate(cfg, f"{source}{' with --set overrides' if overrides else ''}")
    return cfg
