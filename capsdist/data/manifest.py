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
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from webdataset import gopen

from capsdist.errors import DataError

FORMAT = 1
MANIFEST = "manifest.json"


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

    def url(self, shard: ShardInfo) -> str:
        """Path, URL or pipe: command of a shard."""
        return join(self.location, shard.name)

    def prepare_command(self) -> str:
        """The command that (re)creates this dataset at its location."""
        return prepare_command(self.dataset, self.location, self.subset)


def join(location: str, name: str) -> str:
    """Where file `name` of a dataset at `location` is.

    A location with `{}` is a template (`pipe:aws s3 cp s3://bucket/smallnorb/{} -`); otherwise
    it is a directory or URL prefix and the name is appended after a slash.
    """
    if "{}" in location:
        return location.replace("{}", name)
    return location + name if location.endswith("/") else f"{location}/{name}"


def prepare_command(dataset: str, location: str, subset: dict | None = None) -> str:
    """`python launch/prepare_data.py ...` for `dataset` into `location`."""
    cmd = f"python launch/prepare_data.py {dataset} --out {location}"
    if subset:
        cmd += " --subset " + ",".join(f"{k}={v}" for k, v in subset.items())
    return cmd


def load_manifest(location: str | Path) -> Manifest:
    """Read `location`/manifest.json (local directory or URL); DataError with the prepare command."""
    location = str(location)
    guess = location.replace("{}", "").rstrip("/ -").rsplit("/", 1)[-1]
    hint = prepare_command(guess if guess in ("smallnorb", "fashion-mnist", "mnist")
                           else "<smallnorb|fashion-mnist|mnist>", location)
    try:
        with gopen(join(location, MANIFEST)) as f:
            raw = json.loads(f.read())
    except FileNotFoundError:
        raise DataError(f"no {MANIFEST} in {location}: the dataset is not prepared (or its preparation "
                        f"did not finish); run: {hint}") from None
    except (OSError, ValueError) as exc:
        raise DataError(f"cannot read {join(location, MANIFEST)} ({exc}); run: {hint}") from None
    if raw.get("format") != FORMAT:
        raise DataError(f"{join(location, MANIFEST)}: manifest format {raw.get('format')} is not "
                        f"{FORMAT}; prepare the dataset again: {hint}")
    splits = {
        name: SplitInfo(
            num_samples=s["num_samples"],
            shards=tuple(ShardInfo(**shard) for shard in s["shards"]),
            columns={k: np.asarray(v, dtype=np.int64) for k, v in s["columns"].items()},
        )
        for name, s in raw["splits"].items()
    }
    return Manifest(
        location=location,
        dataset=raw["dataset"],
        classes=tuple(raw["classes"]),
        views=tuple(raw["views"]),
        image_shape=tuple(raw["image_shape"]),
        metadata=tuple(raw["metadata"]),
        subset=raw["subset"],
        splits=splits,
        sources=raw["sources"],
        capsdist_version=raw["capsdist_version"],
    )


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
