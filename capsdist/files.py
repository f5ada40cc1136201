"""Durable files: atomic writes (temporary name, fsync, rename, directory fsync) and sha256 digests.

Used wherever a crash must leave either the old file or the new one, never a mix: the shards'
manifest, checkpoint metadata, the run's config, evaluation and experiment results, plots.
"""

from __future__ import annotations

import hashlib
import io
import os
import shutil
from pathlib import Path


def write_atomic(path: str | Path, data: bytes) -> None:
    """Write `data` to `path` through `.tmp-<name>`: write, fsync, rename, fsync the directory."""
    path = Path(path)
    tmp = path.with_name(".tmp-" + path.name)
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


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
