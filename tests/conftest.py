"""Shared fixtures: the real datasets, and a small model zoo for the layer tests."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


def _data_root() -> Path:
    env = os.environ.get("LSUV_DATA_ROOT")
    return Path(env) if env else REPO.parent / "shared" / "data"


@pytest.fixture(scope="session")
def data_root() -> Path:
    """The folder with MNIST and Fashion-MNIST in torchvision's layout (read-only).

    Set ``LSUV_DATA_ROOT``; the tests fail, not skip, without it, so that a CI run without
    data cannot pass by skipping.
    """
    root = _data_root()
    if not (root / "MNIST" / "raw" / "train-images-idx3-ubyte").is_file():
        pytest.fail(f"MNIST not found under {root}; set LSUV_DATA_ROOT to a folder with MNIST/raw")
    return root


@pytest.fixture(autouse=True)
def _seeded():
    torch.manual_seed(0)
