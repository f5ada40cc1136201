"""User-facing errors. Each message says what is wrong and what to do next.

Launch scripts run through `run_cli`: a `CapsdistError` prints its message without a traceback and exits 2.
"""

import sys
from typing import Callable


class CapsdistError(Exception):
    """Base class of every error a user can cause and fix."""


class ConfigError(CapsdistError):
    """A config file, key, value or command-line override is wrong."""


class DataError(CapsdistError):
    """Raw files, shards or a manifest are missing, corrupt or inconsistent."""


class CheckpointError(CapsdistError):
    """A checkpoint is missing, incomplete or does not match the run."""


class StorageError(CapsdistError):
    """A file or directory capsdist writes cannot be written: no space left, read-only, a file in the way."""


class TrainingError(CapsdistError):
    """Training cannot go on (for example, repeated non-finite losses)."""


def run_cli(body: Callable[[], int | None]) -> int:
    """Run a launch script's body: a CapsdistError prints `capsdist: error: ...` without a traceback and gives
    exit status 2; otherwise the body's status (None counts as 0)."""
    try:
        return body() or 0
    except CapsdistError as err:
        print(f"capsdist: error: {err}", file=sys.stderr)
        return 2
