"""The manifest of a prepared dataset: what the shards hold, where they are, and how to check them.

`DIR/manifest.json` (written last, atomically, by capsdist.data.shards):

    {"format": 1, "dataset": "smallnorb", "classes": [...], "views": ["left", "right"],
     "image_shape": [2, 96, 96],              # stored views, H, W of one sample
     "metadata": ["instance", ...],           # per-sample metadata columns besides the label
     "subset": null | {"train": 6000, ...},   # class-balanced subset sizes, if any
     "splits": {"train": {"num_samples": N, "shards": [{"name", "num_samples", "first_index", "sha256"}],
                          "columns": {"label": [...], "instance": [...], ...}}},   # indexed by sample index
     "sources": {file name: {"md5", "sha256"}}, "capsdist_version": "0.1.0"}

Sample `i` of a split sits in the shard whose `first_index <= i < first_index + num_samples`,
under the tar key `f"{i:08d}"`; `columns` give every sample's label and metadata so that
validation and viewpoint splits are chosen, and counted, without reading a shard.

A manifest is data from wherever the shards came from: `load_manifest` checks every key and type,
and shard names must match `SHARD_NAME` (no `/`, `..` or shell characters) before they reach a path
or a `pipe:` command; a local shard that is a symbolic link is refused.
"""

from __future__ import annotations

import hashlib
import json
import re
import shlex
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from capsdist.data.fetch import read_url
from capsdist.core.errors import DataError

FORMAT = 1
MANIFEST = "manifest.json"
SHARD_NAME = re.compile(r"^[a-z]+-\d{6}\.tar(\.gz)?$")  # what capsdist.data.shards writes


@dataclass(frozen=True)
class ShardInfo:
    name: str  # file name relative to the manifest, e.g. "train-000003.tar"
    num_samples: int
    first_index: int  # sample index of its first sample within the split
    sha256: str


@dataclass(frozen=True)
class SplitInfo:
    num_samples: int
    shards: tuple[ShardInfo, ...]
    columns: dict[str, np.ndarray]  # "label" and metadata columns, int64 (num_samples,)


@dataclass(frozen=True)
class Manifest:
    location: str  # directory or URL prefix the manifest was read from
    dataset: str
    classes: tuple[str, ...]
    views: tuple[str, ...]
    image_shape: tuple[int, int, int]  # (views, H, W) as stored
    metadata: tuple[str, ...]
    subset: dict | None
    splits: dict[str, SplitInfo]
    sources: dict
    capsdist_version: str
    sha256: str  # of manifest.json as read: which shards, whatever their location

    def url(self, shard: ShardInfo) -> str:
        """Path, URL or pipe: command of a shard; DataError if a local shard is a symbolic link."""
        url = join(self.location, shard.name)
        if not is_remote(self.location) and Path(url).is_symlink():
            raise DataError(
                f"shard {url} is a symbolic link; capsdist reads only regular files inside the "
                f"dataset directory: prepare the dataset again ({self.prepare_command()})"
            )
        return url

    def prepare_command(self) -> str:
        """The command that (re)creates this dataset at its location."""
        return prepare_command(self.dataset, self.location, self.subset)


def is_remote(location: str) -> bool:
    """True for a URL (`scheme://...`) or a `pipe:` command; False for a local directory."""
    return "://" in location or location.startswith("pipe:")


def join(location: str, name: str) -> str:
    """Where file `name` of a dataset at `location` is.

    A location with `{}` is a template (`pipe:aws s3 cp s3://bucket/smallnorb/{} -`); otherwise
    it is a directory or URL prefix and the name is appended after a slash. In a `pipe:` command
    the name is shell-quoted.
    """
    if location.startswith("pipe:"):
        name = shlex.quote(name)
    if "{}" in location:
        return location.replace("{}", name)
    return location + name if location.endswith("/") else f"{location}/{name}"


def prepare_command(dataset: str, location: str, subset: dict | None = None) -> str:
    """`python launch/prepare_data.py ...` for `dataset` into `location`; for a URL or pipe: location (never
    prepared into) into a local DIR, whose files then go where `location` reads them."""
    remote = is_remote(location)
    cmd = shlex.join(["python", "launch/prepare_data.py", dataset, "--out", "DIR" if remote else location])
    if subset:
        cmd += " --subset " + ",".join(f"{k}={v}" for k, v in subset.items())
    return f"{cmd}, then put DIR's files where {location} reads them" if remote else cmd


def load_manifest(location: str | Path, read_timeout_s: float = 60.0) -> Manifest:
    """Read `location`/manifest.json (local directory, URL or pipe:; a URL fails after `read_timeout_s` seconds
    without data and is read again after a network failure: capsdist.data.fetch); DataError with the prepare
    command, or saying network for a URL the network fails to deliver."""
    location = str(location)
    guess = location.replace("{}", "").rstrip("/ -").rsplit("/", 1)[-1]
    hint = prepare_command(
        guess if guess in ("smallnorb", "fashion-mnist", "mnist") else "<smallnorb|fashion-mnist|mnist>", location
    )
    try:
        data = read_url(join(location, MANIFEST), read_timeout_s)
        raw = json.loads(data)
    except FileNotFoundError:
        raise DataError(
            f"no {MANIFEST} in {location}: the dataset is not prepared (or its preparation did not finish); run: {hint}"
        ) from None
    except (OSError, ValueError) as exc:
        raise DataError(f"cannot read {join(location, MANIFEST)} ({exc}); run: {hint}") from None
    if not isinstance(raw, dict) or raw.get("format") != FORMAT:
        found = raw.get("format") if isinstance(raw, dict) else type(raw).__name__
        raise DataError(
            f"{join(location, MANIFEST)}: manifest format {found} is not {FORMAT}; prepare the dataset again: {hint}"
        )
    try:
        return _parse(location, raw, hashlib.sha256(data).hexdigest())
    except (KeyError, TypeError, ValueError) as exc:
        what = f"missing key {exc}" if isinstance(exc, KeyError) else str(exc)
        raise DataError(
            f"{join(location, MANIFEST)}: malformed manifest ({what}); prepare the dataset again: {hint}"
        ) from None


def _parse(location: str, raw: dict, sha256: str) -> Manifest:
    """The Manifest of a format-1 dict (read from bytes of digest `sha256`); KeyError, TypeError or ValueError
    saying what is wrong."""
    splits = {name: _split(name, s) for name, s in _typed(raw["splits"], dict, "splits").items()}
    image_shape = tuple(_typed(raw["image_shape"], list, "image_shape"))
    if len(image_shape) != 3 or not all(isinstance(v, int) and v > 0 for v in image_shape):
        raise ValueError(f"image_shape {image_shape} is not 3 positive integers")
    return Manifest(
        location=location,
        dataset=_typed(raw["dataset"], str, "dataset"),
        classes=tuple(_strings(raw["classes"], "classes")),
        views=tuple(_strings(raw["views"], "views")),
        image_shape=image_shape,
        metadata=tuple(_strings(raw["metadata"], "metadata")),
        subset=raw["subset"] if raw["subset"] is None else _typed(raw["subset"], dict, "subset"),
        splits=splits,
        sources=_typed(raw["sources"], dict, "sources"),
        capsdist_version=_typed(raw["capsdist_version"], str, "capsdist_version"),
        sha256=sha256,
    )


def _split(name: str, s: dict) -> SplitInfo:
    """A split's entry, its shard names checked against SHARD_NAME and its columns against num_samples."""
    num_samples = _typed(s["num_samples"], int, f"{name}.num_samples")
    shards = []
    for shard in _typed(s["shards"], list, f"{name}.shards"):
        info = ShardInfo(
            name=_typed(shard["name"], str, "shard name"),
            num_samples=_typed(shard["num_samples"], int, "shard num_samples"),
            first_index=_typed(shard["first_index"], int, "shard first_index"),
            sha256=_typed(shard["sha256"], str, "shard sha256"),
        )
        if not SHARD_NAME.match(info.name):
            raise ValueError(f"shard name {info.name!r} is not of the form <split>-NNNNNN.tar[.gz]")
        shards.append(info)
    columns = {
        k: np.asarray(_typed(v, list, f"{name}.columns.{k}"), dtype=np.int64)
        for k, v in _typed(s["columns"], dict, f"{name}.columns").items()
    }
    for key, column in columns.items():
        if column.shape != (num_samples,):
            raise ValueError(f"{name}.columns.{key} has {len(column)} values for {num_samples} samples")
    if "label" not in columns:
        raise KeyError(f"{name}.columns.label")
    return SplitInfo(num_samples=num_samples, shards=tuple(shards), columns=columns)


def _typed(value, kind: type, what: str):
    """`value` if it is a `kind` (bool is not an int), else TypeError naming `what`."""
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise TypeError(f"{what} is {type(value).__name__}, expected {kind.__name__}")
    return value


def _strings(value, what: str) -> list[str]:
    return [_typed(v, str, what) for v in _typed(value, list, what)]


def manifest_json(raw: dict) -> str:
    """Serialise a manifest dict: indented, except the long per-sample columns (one line each)."""
    placeholders = {}
    shallow = json.loads(json.dumps(raw))
    for split_name, split in shallow["splits"].items():
        for col, values in split["columns"].items():
            tag = f"@@{split_name}/{col}@@"
            placeholders[f'"{tag}"'] = json.dumps(values, separators=(",", ":"))
            split["columns"][col] = tag
    text = json.dumps(shallow, indent=2)
    for tag, values in placeholders.items():
        text = text.replace(tag, values)
    return text + "\n"
