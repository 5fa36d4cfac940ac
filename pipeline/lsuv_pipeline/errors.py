"""The error tree: every failure a user can cause derives from :class:`LsuvError`.

The CLI turns an :class:`LsuvError` into a one-line message and a non-zero exit; anything
else is a bug and keeps its traceback.
"""

from __future__ import annotations

__all__ = [
    "ConfigError",
    "DataError",
    "ExecutorError",
    "Interrupted",
    "LayerError",
    "LsuvError",
    "ModelError",
    "OffTarget",
    "StoreError",
]


class LsuvError(Exception):
    """Base of every error this package raises for bad input or a failed run."""


class ConfigError(LsuvError, ValueError):
    """An option value that cannot work (a bad mode, a negative size, ...)."""


class DataError(LsuvError):
    """A dataset that is unknown, missing, or cannot be read or downloaded."""


class ModelError(LsuvError):
    """A model that is unknown, cannot be built, or cannot run on the data."""


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
