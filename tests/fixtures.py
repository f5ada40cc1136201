"""Fixture builders of the tests: raw dataset files in the exact smallNORB and IDX formats, shards prepared from
them, and launch scripts loaded as modules. Nothing here needs a download or the Debian data package."""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import importlib.util
import struct
import sys
from pathlib import Path

import numpy as np
import pytest

from capsdist.data import sources
from capsdist.data.formats import NORB_TYPES, read_bytes
from train_helpers import REPO

NORB_MAGIC = {np.dtype(v).str.lstrip("<>|="): k for k, v in NORB_TYPES.items()}
IDX_CODES = {"u1": 0x08, "i1": 0x09, "i2": 0x0B, "i4": 0x0C, "f4": 0x0D, "f8": 0x0E}


def write(path: Path, data: bytes, gz: bool) -> Path:
    path = Path(str(path) + ".gz") if gz else Path(path)
    path.write_bytes(gzip.compress(data) if gz else data)
    return path


def norb_bytes(array: np.ndarray) -> bytes:
    """NORB binary matrix: <i4 magic, <i4 ndim, max(3, ndim) <i4 dims (unused ones 1), little-endian data."""
    dtype = array.dtype.newbyteorder("<")
    dims = list(array.shape) + [1] * (3 - array.ndim)
    header = struct.pack("<Ii", NORB_MAGIC[dtype.str.lstrip("<>|=")], array.ndim) + struct.pack(f"<{len(dims)}i", *dims)
    return header + array.astype(dtype).tobytes()


def idx_bytes(array: np.ndarray) -> bytes:
    """IDX: 0, 0, type code, ndim, big-endian uint32 dims, big-endian data."""
    dtype = array.dtype.newbyteorder(">")
    header = bytes([0, 0, IDX_CODES[dtype.str.lstrip("<>|=")], array.ndim]) + struct.pack(
        f">{array.ndim}I", *array.shape
    )
    return header + array.astype(dtype).tobytes()


def norb_arrays(n: int, seed: int, instances=(4, 6, 7, 8, 9)) -> dict[str, np.ndarray]:
    """A tiny smallNORB split: images uint8 (n, 2, 96, 96), cat int32 (n,), info int32 (n, 4)."""
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, size=(n, 2, 12, 12), dtype=np.uint8)
    images = np.kron(base, np.ones((1, 1, 8, 8), dtype=np.uint8))  # blocky, so PNGs stay small
    info = np.stack([rng.choice(instances, n), np.arange(n) % 9, (np.arange(n) % 18) * 2, rng.integers(0, 6, n)], 1)
    return {"images": images, "cat": (np.arange(n) % 5).astype(np.int32), "info": info.astype(np.int32)}


def make_norb_source(folder: Path, n_train: int, n_test: int, gz: bool) -> dict[str, dict[str, np.ndarray]]:
    """Write the six smallNORB files (official names and format) into `folder`; return the arrays."""
    folder.mkdir(parents=True, exist_ok=True)
    out = {"train": norb_arrays(n_train, 1), "test": norb_arrays(n_test, 2, instances=(0, 1, 2, 3, 5))}
    for split, arrays in out.items():
        prefix = sources.NORB_TRAIN if split == "train" else sources.NORB_TEST
        for role, array in arrays.items():
            suffix = {"images": "dat", "cat": "cat", "info": "info"}[role]
            write(folder / f"{prefix}{suffix}.mat", norb_bytes(array), gz)
    return out


def make_idx_source(folder: Path, n_train: int, n_test: int, gz: bool) -> dict[str, dict[str, np.ndarray]]:
    """Write the four MNIST-like IDX files into `folder`; return the arrays."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(3)
    out = {}
    for split, n, prefix in (("train", n_train, "train"), ("test", n_test, "t10k")):
        images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        labels = (np.arange(n) % 10).astype(np.uint8)
        write(folder / f"{prefix}-images-idx3-ubyte", idx_bytes(images), gz)
        write(folder / f"{prefix}-labels-idx1-ubyte", idx_bytes(labels), gz)
        out[split] = {"images": images, "labels": labels}
    return out


def trust(monkeypatch, name: str, folder: Path) -> None:
    """Make the registry expect the checksums of the fixture files in `folder` instead of the official ones."""
    spec = sources.DATASETS[name]
    found = sources.locate(name, folder)
    files = {
        split: {role: (fname, hashlib.md5(read_bytes(found[fname])).hexdigest()) for role, (fname, _) in roles.items()}
        for split, roles in spec.files.items()
    }
    monkeypatch.setitem(sources.DATASETS, name, dataclasses.replace(spec, files=files))


def prepare_idx_shards(root: Path, n_train: int, n_test: int, shard_size: int) -> Path:
    """Fashion-MNIST-format shards of n_train + n_test random images (IDX files written under root/idx); root/shards."""
    from capsdist.data.shards import prepare

    make_idx_source(root / "idx", n_train, n_test, gz=False)
    with pytest.MonkeyPatch.context() as mp:
        trust(mp, "fashion-mnist", root / "idx")
        prepare("fashion-mnist", root / "shards", source=root / "idx", shard_size=shard_size, log=lambda _: None)
    return root / "shards"


def launch_script(name: str):
    """launch/<name>.py loaded as the module launch_<name>, so a test can call its main(argv) and its functions in
    process. The module is in sys.modules while it runs, as an imported one is (dataclasses look their module up)."""
    spec = importlib.util.spec_from_file_location(f"launch_{name}", REPO / "launch" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[spec.name]
        raise
    return module
