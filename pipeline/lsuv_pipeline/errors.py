"""The error tree: every failure a user can cause derives from :class:`LsuvError`.

The CLI turns an :class:`LsuvError` into a one-line message and a non-zero exit (2 for a
:class:`ConfigError`, a usage mistake; 3 for :class:`OffTarget`; 130 for
:class:`Interrupted`; 1 for the rest); anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import errno
from pathlib import Path

__all__ = [
    "ConfigError",
    "DataError",
    "ExecutorError",
    "Interrupted",
    "LayerError",
    "LsuvError",
    "ModelError",
    "OffTarget",
    "ReadOnlyStore",
    "StoreError",
    "UnknownDataset",
    "UnknownModel",
    "first_line",
    "write_error",
]


class LsuvError(Exception):
    """Base of every error this package raises for bad input or a failed run."""


class ConfigError(LsuvError, ValueError):
    """An option value that cannot work (a bad mode, a negative size, ...)."""


class DataError(LsuvError):
    """A dataset that is unknown, missing, or cannot be read or downloaded."""


class ModelError(LsuvError):
    """A model that is unknown, cannot be built, or cannot run on the data."""


class UnknownDataset(ConfigError, DataError):
    """A dataset name that names no dataset (a usage mistake, not missing data)."""


class UnknownModel(ConfigError, ModelError):
    """A model name that names no model, or a ``package.module:factory`` of another form."""


class LayerError(LsuvError):
    """A layer whose statistics make the solve impossible (dead, constant or non-finite)."""


class OffTarget(LsuvError):
    """A finished run whose verified statistics miss the tolerance on the solve split.

    The store is complete and says so (``verification``); ``result`` holds what the run
    computed, for a caller who wants to look at it.
    """

    def __init__(self, message: str, result=None) -> None:
        super().__init__(message)
        self.result = result


class StoreError(LsuvError):
    """A run store that is missing, damaged, locked or of another configuration."""


class ExecutorError(LsuvError):
    """The cluster cannot be reached, was lost during a pass, or mixes hardware."""


class Interrupted(LsuvError):
    """The run was stopped on request (Ctrl-C); its store resumes where it stopped."""


class ReadOnlyStore(StoreError):
    """A run store that cannot be written here (read-only file system, no permission)."""


def first_line(exc: BaseException, limit: int = 200) -> str:
    """The first line of an exception's message (its type's name if it has none)."""
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0][:limit]


def write_error(path: Path, what: str, exc: OSError) -> StoreError:
    """One line for an OS error while writing ``what`` into the store at ``path``."""
    where = repr(str(path))
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return StoreError(
            f"no space left on the device of {where} while writing {what}; everything "
            "finished before is kept there: free some space and rerun the same command "
            "to resume"
        )
    if exc.errno == errno.EROFS:
        return ReadOnlyStore(f"{where} is on a read-only file system (writing {what})")
    if exc.errno in (errno.EACCES, errno.EPERM):
        return ReadOnlyStore(f"no permission to write {what} in {where}")
    if exc.errno in (errno.ENOTDIR, errno.EEXIST):
        return StoreError(f"cannot create {where}: a part of the path is a file, not a folder")
    return StoreError(f"cannot write {what} in {where}: {exc.strerror or exc}")
