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


class StoreError(LsuvError):
    """A run store that is missing, damaged, locked or of another configuration."""


class ExecutorError(LsuvError):
    """The cluster cannot be reached, was lost during a pass, or mixes hardware."""


class Interrupted(LsuvError):
    """The run was stopped on request (Ctrl-C); its store resumes where it stopped."""
