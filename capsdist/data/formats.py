"""Readers of the raw dataset formats: the NORB binary matrix format and IDX (MNIST-likes).

`read_bytes` returns a file's content, gunzipped when it is gzipped (detected from its first
bytes, not its name); the parsers check the header of that content against the data that follows
and return a numpy array:

- NORB binary matrix (smallNORB `.mat`): little-endian int32 magic giving the element type,
  int32 ndim, then max(3, ndim) int32 dims (only the first ndim count), then the data.
  smallNORB: `-dat` uint8 (N, 2, 96, 96), `-cat` int32 (N,), `-info` int32 (N, 4).
- IDX: two zero bytes, a type byte, a byte ndim, then ndim big-endian uint32 dims, then the
  big-endian data. MNIST images uint8 (N, 28, 28), labels uint8 (N,).

Every problem (missing, truncated, trailing bytes, bad magic) raises `DataError` naming the file.
"""

from __future__ import annotations

import gzip
import zlib
from pathlib import Path

import numpy as np

from capsdist.core.errors import DataError

NORB_TYPES = {
    0x1E3D4C51: np.dtype("<f4"),  # single precision matrix
    0x1E3D4C53: np.dtype("<f8"),  # double precision matrix
    0x1E3D4C54: np.dtype("<i4"),  # integer matrix
    0x1E3D4C55: np.dtype("u1"),  # byte matrix
    0x1E3D4C56: np.dtype("<i2"),  # short matrix
}
NORB_PACKED = 0x1E3D4C52  # "packed matrix" of the spec: no published layout, refused with a clear error

IDX_TYPES = {
    0x08: np.dtype("u1"),
    0x09: np.dtype("i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}


def read_bytes(path: Path) -> bytes:
    """The content of `path`, decompressed if it is gzipped (magic 1f 8b)."""
    try:
        raw = Path(path).read_bytes()
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    if raw[:2] != b"\x1f\x8b":
        return raw
    try:
        return gzip.decompress(raw)
    except (EOFError, OSError, zlib.error) as exc:
        raise DataError(f"{path}: gzip stream is truncated or corrupt ({exc}); download the file again") from None


def _array(path: Path, data: bytes, offset: int, dims: list[int], dtype: np.dtype) -> np.ndarray:
    """View data[offset:] as `dims` of `dtype`, requiring the exact size the header announces."""
    if any(d < 0 for d in dims):
        raise DataError(f"{path}: negative dimension in header {dims}")
    expected = int(np.prod(dims, dtype=np.int64)) * dtype.itemsize
    actual = len(data) - offset
    if actual < expected:
        raise DataError(
            f"{path}: truncated: header announces {dims} ({expected} bytes of data) "
            f"but the file holds {actual}; download the file again"
        )
    if actual > expected:
        raise DataError(
            f"{path}: {actual - expected} unexpected bytes after the {dims} data; "
            "the file is not in the format it claims"
        )
    return np.frombuffer(data, dtype=dtype, count=int(np.prod(dims)), offset=offset).reshape(dims)


def parse_norb(data: bytes, path: Path) -> np.ndarray:
    """Parse the content of a NORB binary matrix file into an array of its element type."""
    if len(data) < 8:
        raise DataError(f"{path}: truncated: {len(data)} bytes, shorter than a NORB header")
    magic, ndim = np.frombuffer(data, "<i4", count=2)
    magic, ndim = int(magic) & 0xFFFFFFFF, int(ndim)
    if magic == NORB_PACKED:
        raise DataError(f"{path}: NORB 'packed matrix' (magic 0x{magic:08X}) is not supported")
    if magic not in NORB_TYPES:
        raise DataError(
            f"{path}: bad magic 0x{magic:08X}: not a NORB binary matrix file "
            f"(expected one of {', '.join(f'0x{m:08X}' for m in NORB_TYPES)})"
        )
    if not 0 <= ndim <= 64:
        raise DataError(f"{path}: implausible number of dimensions {ndim} in the header")
    header_dims = max(3, ndim)
    offset = 8 + 4 * header_dims
    if len(data) < offset:
        raise DataError(f"{path}: truncated inside the header")
    dims = np.frombuffer(data, "<i4", count=header_dims, offset=8)[:ndim].tolist()
    return _array(path, data, offset, dims, NORB_TYPES[magic])


def parse_idx(data: bytes, path: Path) -> np.ndarray:
    """Parse the content of an IDX file into an array in native byte order."""
    if len(data) < 4:
        raise DataError(f"{path}: truncated: {len(data)} bytes, shorter than an IDX header")
    zero, type_code, ndim = data[0:2], data[2], data[3]
    if zero != b"\x00\x00" or type_code not in IDX_TYPES:
        raise DataError(f"{path}: bad magic {data[:4].hex()}: not an IDX file")
    offset = 4 + 4 * ndim
    if len(data) < offset:
        raise DataError(f"{path}: truncated inside the header")
    dims = np.frombuffer(data, ">u4", count=ndim, offset=4).astype(np.int64).tolist()
    dtype = IDX_TYPES[type_code]
    return _array(path, data, offset, dims, dtype).astype(dtype.newbyteorder("="), copy=False)
