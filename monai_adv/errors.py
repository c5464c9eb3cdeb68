"""The errors monai-adv raises itself about a user's data, settings, checkpoints, locks and tracking.

Each is a :class:`MonaiAdvError` and also the built-in error a caller would expect (``ValueError``,
``FileNotFoundError``, ``RuntimeError``), so ``except ValueError`` keeps working. The bundle's command-line error
report (:mod:`monai_adv.bundle.cli`) recognises them and ends the output with their message in one line.

This module imports nothing beyond the standard library.
"""

from __future__ import annotations

__all__ = [
    "CheckpointError",
    "DataError",
    "LoadError",
    "LockError",
    "MissingFileError",
    "MonaiAdvError",
    "SettingsError",
    "StorageError",
    "TrackingError",
    "TrainingInterrupted",
    "UnreadableFileError",
]


class MonaiAdvError(Exception):
    """Base class of the errors that monai-adv raises about what a user gave it (not about its own bugs)."""


class DataError(MonaiAdvError, ValueError):
    """A data file or datalist cannot be used as it is (names the file)."""


class StorageError(MonaiAdvError, OSError):
    """Files cannot be written where the bundle must write them (read-only or full disk, a file in the way)."""


class UnreadableFileError(MonaiAdvError, OSError):
    """A data file cannot be decoded (truncated, corrupt), naming it."""


class LoadError(MonaiAdvError, RuntimeError):
    """Loading an item's files failed for another reason (e.g. no reader for the format), naming the files."""


class SettingsError(MonaiAdvError, ValueError):
    """A bundle setting has a value that cannot work (names the key)."""


class MissingFileError(MonaiAdvError, FileNotFoundError):
    """An input file or folder the user named (or the bundle needs) does not exist."""


class CheckpointError(MonaiAdvError, ValueError):
    """A checkpoint does not fit the network it is loaded into (names the file and the settings to repeat)."""


class LockError(MonaiAdvError, RuntimeError):
    """Another process holds the bundle root's training lock."""


class TrainingInterrupted(MonaiAdvError, RuntimeError):
    """The training was stopped by a signal (SIGTERM from a scheduler or ``docker stop``)."""


class TrackingError(MonaiAdvError, RuntimeError):
    """The MLflow tracking server cannot be used."""
