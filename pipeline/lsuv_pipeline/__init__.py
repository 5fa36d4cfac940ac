"""Exact, full-dataset LSUV initialization (Mishkin & Matas 2015), stored in Zarr.

from lsuv_pipeline import RunConfig, compute
result = compute(RunConfig(dataset="mnist"), "run.zarr")

model = lsuv_pipeline.lsuv_(model, train_loader)  # in a training script
"""

from .checkpoint import Run, export, load_init, open_run
from .config import RunConfig
from .errors import (
    ConfigError,
    DataError,
    ExecutorError,
    Interrupted,
    LayerError,
    LsuvError,
    ModelError,
    OffTarget,
    ReadOnlyStore,
    StoreError,
)
from .inplace import lsuv_
from .models import MJ, mj
from .run import RunResult, compute
from .verify import Verification, verify

__all__ = [
    "MJ",
    "ConfigError",
    "DataError",
    "ExecutorError",
    "Interrupted",
    "LayerError",
    "LsuvError",
    "ModelError",
    "OffTarget",
    "ReadOnlyStore",
    "Run",
    "RunConfig",
    "RunResult",
    "StoreError",
    "Verification",
    "compute",
    "export",
    "load_init",
    "lsuv_",
    "mj",
    "open_run",
    "verify",
]
