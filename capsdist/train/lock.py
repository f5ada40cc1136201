"""One trainer per run directory: an advisory lock on run_dir/run.lock for the life of the run.

The lock is flock(2), which the kernel drops when its process ends however it ends (kill -9 included), so it
is never stale. One process holds it for the whole run, global rank 0: the nodes of one run share the
directory, so a lock per node would shut them out of each other. On NFS (Linux 2.6.12 and later) flock is a
lock on the whole file that every client sees, released by the server when a crashed client's lease runs out.
Where the filesystem has no locks at all (Lustre mounted without `flock`), a warning says that nothing stops a
second trainer. Readers (launch/evaluate.py, the experiments) never take it. The holder writes its pid, host
and start time into the file, for the message the next trainer gives.

Forked children (the loader workers) would inherit the lock and hold it after the trainer died; their copy of
it is closed right after the fork.
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import socket
import time
import weakref
from pathlib import Path

log = logging.getLogger("capsdist")

LOCK_FILE = "run.lock"
_BUSY = (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES)  # held by another open file: flock, or fcntl on NFS
_held: weakref.WeakSet[RunLock] = weakref.WeakSet()


class RunLock:
    """The lock of one run directory (run_dir/run.lock); `acquire`, then `release` when the run ends."""

    def __init__(self, run_dir: str | Path):
        self.path = Path(run_dir) / LOCK_FILE
        self._fd: int | None = None

    def acquire(self) -> str | None:
        """Take the lock without waiting. None when this process holds it now (or the filesystem cannot lock:
        a warning says so); otherwise who holds it: "pid P on host H since T"."""
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            os.close(fd)
            if err.errno in _BUSY:
                return _holder(self.path)
            log.warning(
                "cannot lock %s (%s): this filesystem has no locks, so nothing stops a second trainer on this "
                "run directory; make sure there is only one",
                self.path,
                err,
            )
            return None
        os.ftruncate(fd, 0)
        holder = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%Y-%m-%d %H:%M:%S")}
        os.write(fd, json.dumps(holder).encode())
        self._fd = fd
        _held.add(self)
        return None

    def release(self) -> None:
        """Drop the lock (closing the file drops it); nothing when not held."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        _held.discard(self)


def _holder(path: Path) -> str:
    """Who holds the lock, from what the holder wrote into it."""
    try:
        holder = json.loads(path.read_text())
        return f"pid {holder['pid']} on host {holder['host']} since {holder['since']}"
    except (OSError, ValueError, KeyError, TypeError):
        return "a process that has not written its pid yet"


def _close_in_child() -> None:
    """In a forked child: close the inherited lock files, so the lock ends with the process that took it."""
    for lock in list(_held):
        os.close(lock._fd)
        lock._fd = None
    _held.clear()


os.register_at_fork(after_in_child=_close_in_child)
