"""Exact, full-dataset LSUV initialization (Mishkin & Matas 2015), stored in Zarr.

from lsuv_pipeline import RunConfig, compute
result = compute(RunConfig(dataset="mnist"), "run.zarr")
"""

from .config import RunConfig
from .errors import ConfigError, DataError, LayerError, LsuvError, ModelError, StoreError
from .models import MJ, mj
from .run import RunResult, compute

__all__ = [
    "MJ",
    "ConfigError",
    "DataError",
    "LayerError",
    "LsuvError",
    "ModelError",
    "RunConfig",
    "RunResult",
    "StoreError",
    "compute",
    "mj",
]
