"""User-facing errors. Each message says what is wrong and what to do next.

Launch scripts catch `CapsdistError`, print its message without a traceback and exit non-zero.
"""


class CapsdistError(Exception):
    """Base class of every error a user can cause and fix."""


class ConfigError(CapsdistError):
    """A config file, key, value or command-line override is wrong."""


class DataError(CapsdistError):
    """Raw files, shards or a manifest are missing, corrupt or inconsistent."""


class CheckpointError(CapsdistError):
    """A checkpoint is missing, incomplete or does not match the run."""


class TrainingError(CapsdistError):
    """Training cannot go on (for example, repeated non-finite losses)."""
