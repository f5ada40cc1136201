"""Durable files: atomic writes (temporary name, fsync, rename, directory fsync) and sha256 digests; writes that
fail as a StorageError saying what is wrong (no space left, read-only, a file in the way) and what to do.

Used wherever a crash must leave either the old file or the new one, never a mix: the shards'
manifest, checkpoint metadata, the run's config, the W&B run id, evaluation and experiment results, plots.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import io
import os
import shutil
from pathlib import Path
from typing import Iterator

from capsdist.core.errors import StorageError

_NO_SPACE = (errno.ENOSPC, errno.EDQUOT)
_REFUSED = (errno.EROFS, errno.EACCES, errno.EPERM)


def write_atomic(path: str | Path, data: bytes) -> None:
    """Write `data` to `path` through `.tmp-<name>`: write, fsync, rename, fsync the directory. A failed write
    leaves the old file (or none) and no temporary one; StorageError."""
    path = Path(path)
    tmp = path.with_name(".tmp-" + path.name)
    with writing(path):
        try:
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except OSError:
            with contextlib.suppress(OSError):
                tmp.unlink()  # a partial file would keep the space a full disk needs
            raise
        fsync_dir(path.parent)


@contextlib.contextmanager
def writing(path: str | Path) -> Iterator[None]:
    """Turn an OSError raised in the block, which writes `path`, into the StorageError of `storage_error`."""
    try:
        yield
    except OSError as err:
        raise storage_error(path, err) from None


def storage_error(path: str | Path, err: Exception) -> StorageError | None:
    """What a failed write of `path` means, as a StorageError: no space left (ENOSPC, or an error without an errno
    while the filesystem is full: torch.save's C++ writer says only "basic_ios::clear"), read-only or denied, a
    file where a directory belongs, or another OSError; None for another error with space left."""
    code = err.errno if isinstance(err, OSError) else None
    if code in _NO_SPACE or (code is None and disk_full(path)):
        return StorageError(
            f"no space left on {path} ({err}); free space there, then run again "
            "(a training run continues from its newest checkpoint with --resume auto)"
        )
    if not isinstance(err, OSError):
        return None
    if code in _REFUSED:
        return StorageError(f"cannot write {path}: {err.strerror}; make it writable or choose another place")
    if code in (errno.ENOTDIR, errno.EEXIST):
        return StorageError(f"cannot write {path}: a part of it is a file, not a directory; move that file away")
    return StorageError(f"cannot write {path}: {err}")


def disk_full(path: str | Path) -> bool:
    """Whether the filesystem that holds `path` (or its nearest existing parent) has less than 1 MiB free."""
    path = Path(path).absolute()
    while not path.exists():
        path = path.parent
    return shutil.disk_usage(path).free < 1 << 20


def check_writable_dir(path: str | Path) -> None:
    """Make the directory `path` (and its parents) when missing and create and remove a file in it: StorageError
    at once when a file is in the way, the place is read-only or the disk is full."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise StorageError(f"{path} is a file, not a directory; move it away or choose another place")
    probe = path / f".tmp-write-test-{os.getpid()}"
    with writing(path):
        path.mkdir(parents=True, exist_ok=True)
        try:
            with open(probe, "wb") as f:
                f.write(b"x")  # a block, not only an inode: a full disk refuses it
        finally:
            with contextlib.suppress(OSError):
                probe.unlink()


def write_figure(path: str | Path, figure, dpi: int = 110) -> Path:
    """Write a matplotlib `figure` as a PNG to `path` atomically (parent folders made); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=dpi)
    write_atomic(path, buffer.getvalue())
    return path


def copy_durable(source: str | Path, target: str | Path) -> None:
    """Copy a file (data and metadata) and fsync the copy; a `copy_function` for shutil.copytree."""
    shutil.copy2(source, target)
    with open(target, "rb") as f:
        os.fsync(f.fileno())


def fsync_dir(path: str | Path) -> None:
    """fsync a directory, so that renames and new entries in it survive a power loss."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def sha256_file(path: str | Path, *, fsync: bool = False) -> str:
    """Hex sha256 of the file at `path`; with fsync=True its data is also flushed to disk."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
        if fsync:
            os.fsync(f.fileno())
    return digest.hexdigest()
