"""Dataset registry: where each dataset's raw files come from, their checksums, and loading them.

`load_split(name, files, split)` returns a `RawSplit`: images uint8 (N, V, H, W) with V views
(smallNORB: left and right camera; MNIST-likes: one image), labels int64 (N,), and metadata
columns int64 (N,) each (smallNORB: instance, elevation, azimuth, lighting).

Checksums are MD5 of the *decompressed* content of the official files, so a file passes whether
it is gzipped or not and whoever recompressed it (Debian's Fashion-MNIST .gz files differ from
upstream's, their content does not). Sources of the values: smallNORB, the md5 lists of several
public loaders of the NYU release (cross-checked, identical); Fashion-MNIST, computed here from
the Debian package and equal to published lists; MNIST, a published list of the LeCun release.
"""

from __future__ import annotations

import hashlib
import os
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from capsdist.data.formats import parse_idx, parse_norb, read_bytes
from capsdist.core.errors import DataError

NORB_URL = "https://cs.nyu.edu/~ylclab/data/norb-v1.0-small/"
NORB_TRAIN = "smallnorb-5x46789x9x18x6x2x96x96-training-"
NORB_TEST = "smallnorb-5x01235x9x18x6x2x96x96-testing-"


@dataclass(frozen=True)
class DatasetSpec:
    """What a dataset is: classes, views per sample, raw files per split and role."""

    name: str
    classes: tuple[str, ...]
    views: tuple[str, ...]  # image members of a sample, e.g. ("left", "right")
    image_size: tuple[int, int]  # (H, W) of each stored view
    metadata: tuple[str, ...]  # metadata columns besides the label
    files: dict[str, dict[str, tuple[str, str]]]  # split -> role -> (file name without .gz, md5 of content)
    parser: str  # "norb" or "idx"
    download: str = field(default="")  # "norb" (own downloader) or torchvision dataset class name


DATASETS: dict[str, DatasetSpec] = {
    "smallnorb": DatasetSpec(
        name="smallnorb",
        classes=("animal", "human", "airplane", "truck", "car"),
        views=("left", "right"),
        image_size=(96, 96),
        metadata=("instance", "elevation", "azimuth", "lighting"),
        files={
            "train": {
                "images": (NORB_TRAIN + "dat.mat", "8138a0902307b32dfa0025a36dfa45ec"),
                "labels": (NORB_TRAIN + "cat.mat", "fd5120d3f770ad57ebe620eb61a0b633"),
                "info": (NORB_TRAIN + "info.mat", "19faee774120001fc7e17980d6960451"),
            },
            "test": {
                "images": (NORB_TEST + "dat.mat", "e9920b7f7b2869a8f1a12e945b2c166c"),
                "labels": (NORB_TEST + "cat.mat", "fd5120d3f770ad57ebe620eb61a0b633"),
                "info": (NORB_TEST + "info.mat", "7c5b871cc69dcadec1bf6a18141f5edc"),
            },
        },
        parser="norb",
        download="norb",
    ),
    "fashion-mnist": DatasetSpec(
        name="fashion-mnist",
        classes=(
            "T-shirt/top",
            "Trouser",
            "Pullover",
            "Dress",
            "Coat",
            "Sandal",
            "Shirt",
            "Sneaker",
            "Bag",
            "Ankle boot",
        ),
        views=("image",),
        image_size=(28, 28),
        metadata=(),
        files={
            "train": {
                "images": ("train-images-idx3-ubyte", "f4a8712d7a061bf5bd6d2ca38dc4d50a"),
                "labels": ("train-labels-idx1-ubyte", "9018921c3c673c538a1fc5bad174d6f9"),
            },
            "test": {
                "images": ("t10k-images-idx3-ubyte", "8181f5470baa50b63fa0f6fddb340f0a"),
                "labels": ("t10k-labels-idx1-ubyte", "15d484375f8d13e6eb1aabb0c3f46965"),
            },
        },
        parser="idx",
        download="FashionMNIST",
    ),
    "mnist": DatasetSpec(
        name="mnist",
        classes=tuple(str(d) for d in range(10)),
        views=("image",),
        image_size=(28, 28),
        metadata=(),
        files={
            "train": {
                "images": ("train-images-idx3-ubyte", "6bbc9ace898e44ae57da46a324031adb"),
                "labels": ("train-labels-idx1-ubyte", "a25bea736e30d166cdddb491f175f624"),
            },
            "test": {
                "images": ("t10k-images-idx3-ubyte", "2646ac647ad5339dbf082846283269ea"),
                "labels": ("t10k-labels-idx1-ubyte", "27ae3e4e09519cfbb04c329615203637"),
            },
        },
        parser="idx",
        download="MNIST",
    ),
}


@dataclass
class RawSplit:
    """One split of a raw dataset, in the source's order."""

    images: np.ndarray  # uint8 (N, V, H, W)
    labels: np.ndarray  # int64 (N,)
    metadata: dict[str, np.ndarray]  # column -> int64 (N,)
    checksums: dict[str, dict[str, str]]  # file name -> {"md5": of content, "sha256": of the file as read}


def spec(name: str) -> DatasetSpec:
    """The registry entry of `name`, or a DataError listing the known datasets."""
    if name not in DATASETS:
        raise DataError(f"unknown dataset {name!r}; known: {', '.join(DATASETS)}")
    return DATASETS[name]


def locate(name: str, source: Path) -> dict[str, Path]:
    """Map each raw file name of dataset `name` to its path in `source` (plain or .gz)."""
    found = {}
    for roles in spec(name).files.values():
        for fname, _ in roles.values():
            candidates = [source / fname, source / (fname + ".gz")]
            path = next((p for p in candidates if p.is_file()), None)
            if path is None:
                raise DataError(
                    f"{name}: {fname}[.gz] not found in {source}; put the official files "
                    "there, or leave out --source to download them"
                )
            found[fname] = path
    return found


def fetch(name: str, cache: Path) -> dict[str, Path]:
    """Download the raw files of `name` into `cache` (resuming partial downloads); paths by file name.

    Files already in the cache are checked against the official checksums first: a corrupt one is
    deleted and downloaded again (once; still corrupt is a DataError)."""
    md5 = {fname: digest for roles in spec(name).files.values() for fname, digest in roles.values()}
    for _ in range(2):
        files = _download(name, cache)
        corrupt = [path for fname, path in files.items() if not _matches(path, md5[fname])]
        if not corrupt:
            return files
        for path in corrupt:
            print(f"capsdist: {path} in the download cache is corrupt; downloading it again")
            for twin in {path, path.with_name(path.name.removesuffix(".gz")), path.with_name(path.name + ".gz")}:
                twin.unlink(missing_ok=True)
    raise DataError(
        f"{corrupt[0]}: still corrupt after downloading it again; check the network or mirror, "
        "or fetch the files yourself and pass their folder as --source"
    )


def _matches(path: Path, md5: str) -> bool:
    """True when the content of `path` (gunzipped) has the official md5."""
    try:
        _read_verified(path, md5)
    except DataError:
        return False
    return True


def _download(name: str, cache: Path) -> dict[str, Path]:
    """Download what is missing from `cache`: the NORB files directly, the others through torchvision."""
    ds = spec(name)
    cache.mkdir(parents=True, exist_ok=True)
    if ds.download == "norb":
        for roles in ds.files.values():
            for fname, _ in roles.values():
                target = cache / (fname + ".gz")
                if not target.is_file():
                    download(NORB_URL + fname + ".gz", target)
        return locate(name, cache)
    import torchvision.datasets

    try:
        getattr(torchvision.datasets, ds.download)(root=str(cache), download=True)
    except (OSError, RuntimeError, urllib.error.URLError) as exc:
        raise DataError(
            f"{name}: download through torchvision failed ({exc}); fetch the IDX files "
            "yourself and pass their folder as --source"
        ) from None
    return locate(name, cache / ds.download / "raw")


def download(url: str, target: Path, chunk: int = 1 << 20) -> None:
    """Fetch `url` to `target` with a progress bar, resuming `target.part` with an HTTP Range request."""
    part = target.with_name(target.name + ".part")
    have = part.stat().st_size if part.exists() else 0
    request = urllib.request.Request(url, headers={"Range": f"bytes={have}-"} if have else {})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            if have and response.status != 206:  # server ignored the range: start over
                have = 0
            total = int(response.headers.get("Content-Length", 0)) + have or None
            with (
                open(part, "ab" if have else "wb") as out,
                tqdm(total=total, initial=have, unit="B", unit_scale=True, desc=target.name) as bar,
            ):
                while block := response.read(chunk):
                    out.write(block)
                    bar.update(len(block))
    except urllib.error.HTTPError as exc:
        if exc.code == 416 and have:  # the partial file is already complete
            os.replace(part, target)
            return
        raise DataError(f"downloading {url} failed: {exc}; run again to resume") from None
    except (urllib.error.URLError, OSError) as exc:
        raise DataError(f"downloading {url} failed: {exc}; run again to resume") from None
    os.replace(part, target)


def _read_verified(path: Path, md5: str) -> tuple[bytes, dict[str, str]]:
    """Content of `path` (gunzipped) after checking its md5 against the official one."""
    data = read_bytes(path)
    got = hashlib.md5(data).hexdigest()
    if got != md5:
        raise DataError(
            f"{path}: checksum mismatch: content md5 {got}, official {md5}; the file is "
            "corrupt or not the official release; download it again"
        )
    return data, {"md5": got, "sha256": hashlib.sha256(path.read_bytes()).hexdigest()}


def load_split(name: str, files: dict[str, Path], split: str) -> RawSplit:
    """Read, verify and check the shapes of split `split` of dataset `name` from `files`."""
    ds = spec(name)
    parse = parse_norb if ds.parser == "norb" else parse_idx
    arrays, checksums = {}, {}
    for role, (fname, md5) in ds.files[split].items():
        data, checksums[fname] = _read_verified(files[fname], md5)
        arrays[role] = parse(data, files[fname])
    images, labels = arrays["images"], arrays["labels"]
    if images.ndim == 3:  # IDX (N, H, W): one view
        images = images[:, None]
    n = len(labels)
    h, w = ds.image_size
    _check_shape(files, ds.files[split]["images"][0], images, (n, len(ds.views), h, w), np.uint8)
    _check_shape(files, ds.files[split]["labels"][0], labels, (n,), None)
    metadata = {}
    if "info" in arrays:
        info = arrays["info"]
        _check_shape(files, ds.files[split]["info"][0], info, (n, len(ds.metadata)), None)
        metadata = {key: info[:, i].astype(np.int64) for i, key in enumerate(ds.metadata)}
    labels = labels.astype(np.int64)
    if labels.min(initial=0) < 0 or labels.max(initial=0) >= len(ds.classes):
        raise DataError(f"{files[ds.files[split]['labels'][0]]}: labels outside 0..{len(ds.classes) - 1}")
    return RawSplit(images=images, labels=labels, metadata=metadata, checksums=checksums)


def _check_shape(files: dict[str, Path], fname: str, array: np.ndarray, shape: tuple, dtype) -> None:
    """DataError naming the file when `array` does not have `shape` (and `dtype` if given)."""
    if array.shape != shape or (dtype is not None and array.dtype != dtype):
        raise DataError(
            f"{files[fname]}: shape {array.shape} {array.dtype}, expected {shape}"
            f"{' ' + np.dtype(dtype).name if dtype is not None else ''} "
            "(consistent with the other files of the split)"
        )
