"""Raw format readers on files written in the exact smallNORB and IDX formats (tests/fixtures.py)."""

from __future__ import annotations

import gzip
import struct

import numpy as np
import pytest

from capsdist.data.formats import parse_idx, parse_norb, read_bytes
from capsdist.core.errors import DataError
from fixtures import idx_bytes, norb_bytes, write


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
