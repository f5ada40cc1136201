"""Raw format readers, plus the fixture writers (exact smallNORB and IDX formats) the other data tests use."""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import struct
from pathlib import Path

import numpy as np
import pytest

from capsdist.data import sources
from capsdist.data.formats import NORB_TYPES, parse_idx, parse_norb, read_bytes
from capsdist.errors import DataError

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


@pytest.mark.parametrize("gz", [False, True])
@pytest.mark.parametrize("dtype", ["u1", "<i4", "<f4", "<f8", "<i2"])
@pytest.mark.parametrize("shape", [(7,), (5, 4), (3, 2, 4, 5)])
def test_norb_round_trip(tmp_path, gz, dtype, shape):
    array = (np.arange(np.prod(shape)) * 3 - 5).astype(dtype).reshape(shape)
    if dtype == "u1":
        array = np.arange(np.prod(shape), dtype=np.uint8).reshape(shape)
    path = write(tmp_path / "x.mat", norb_bytes(array), gz)
    got = parse_norb(read_bytes(path), path)
    assert got.shape == shape and got.dtype == np.dtype(dtype)
    np.testing.assert_array_equal(got, array)


def test_norb_one_dim_header_has_three_dims():
    data = norb_bytes(np.arange(4, dtype=np.int32))
    assert struct.unpack("<Iiiii", data[:20]) == (0x1E3D4C54, 1, 4, 1, 1)


@pytest.mark.parametrize("gz", [False, True])
@pytest.mark.parametrize(
    "array", [np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4), np.array([1, -7, 300000], dtype=np.int32)]
)
def test_idx_round_trip(tmp_path, gz, array):
    path = write(tmp_path / "x-idx", idx_bytes(array), gz)
    got = parse_idx(read_bytes(path), path)
    np.testing.assert_array_equal(got, array)
    assert got.dtype == array.dtype


def test_bad_magic_is_named(tmp_path):
    data = bytearray(norb_bytes(np.zeros((2, 2), dtype=np.uint8)))
    data[0] ^= 0xFF
    with pytest.raises(DataError, match="bad magic.*not a NORB"):
        parse_norb(bytes(data), tmp_path / "f.mat")
    with pytest.raises(DataError, match="bad magic.*not an IDX"):
        parse_idx(b"\x01\x00\x08\x01" + b"\x00" * 8, tmp_path / "f-idx")


@pytest.mark.parametrize("fmt", ["norb", "idx"])
def test_truncated_and_trailing_bytes(tmp_path, fmt):
    array = np.zeros((4, 6), dtype=np.uint8)
    data, parse = (norb_bytes(array), parse_norb) if fmt == "norb" else (idx_bytes(array), parse_idx)
    with pytest.raises(DataError, match="truncated"):
        parse(data[:-1], tmp_path / "f")
    with pytest.raises(DataError, match="truncated"):
        parse(data[:10], tmp_path / "f")
    with pytest.raises(DataError, match="unexpected bytes"):
        parse(data + b"\x00", tmp_path / "f")


def test_truncated_gzip_and_missing_file(tmp_path):
    path = tmp_path / "f.gz"
    path.write_bytes(gzip.compress(bytes(1000))[:-12])
    with pytest.raises(DataError, match="gzip stream is truncated"):
        read_bytes(path)
    with pytest.raises(DataError, match="not found"):
        read_bytes(tmp_path / "nothing")
