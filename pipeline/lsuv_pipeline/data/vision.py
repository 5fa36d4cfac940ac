"""torchvision's datasets: MNIST, Fashion-MNIST (IDX files), CIFAR-10 and CIFAR-100."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable, Mapping
from pathlib import Path

import torch

from ..errors import ConfigError, DataError
from .base import Source, TensorSource, check_option_names, int_option

# -- torchvision datasets ------------------------------------------------------------


@contextlib.contextmanager
def _stdout_to_stderr():
    """torchvision prints download progress to stdout; keep stdout for results."""
    with contextlib.redirect_stdout(sys.stderr):
        yield


def _train_flag(name: str, split: str) -> bool:
    if split not in ("train", "test"):
        raise ConfigError(f"dataset {name!r} has splits 'train' and 'test', not {split!r}")
    return split == "train"


def _open_torchvision(name: str, cls_name: str, folder: str, root: Path, train: bool, download):
    """Construct torchvision's dataset class; a missing dataset or failed download is a DataError.

    ``folder`` is where the class keeps its files under ``root``; error messages name it.
    """
    import torchvision.datasets as tvd

    cls = getattr(tvd, cls_name)
    where = str(root / folder)
    try:
        return cls(root=str(root), train=train, download=False)
    except RuntimeError:
        if not download:
            raise DataError(
                f"{name} not found under {where!r} (missing or corrupt files) and downloading "
                f"is off; point --data-root (or $LSUV_DATA_ROOT) at a folder that holds {folder}"
            ) from None
    try:
        with _stdout_to_stderr():
            return cls(root=str(root), train=train, download=True)
    except Exception as exc:
        reason = str(exc).strip().splitlines()[-1] if str(exc).strip() else repr(exc)
        raise DataError(
            f"{name} not found under {where!r} and the download failed ({reason}); point "
            f"--data-root (or $LSUV_DATA_ROOT) at a folder that holds {folder}"
        ) from None


def torchvision_idx(cls_name: str, mean: float, std: float) -> Callable[..., Source]:
    """Loader for the MNIST-format datasets of torchvision (IDX files under raw/)."""

    def load(name: str, split: str, root: Path, download: bool, options: Mapping) -> Source:
        check_option_names(name, options, ("resize",))
        resize = int_option(name, options, "resize", 1) if "resize" in options else None
        train = _train_flag(name, split)
        ds = _open_torchvision(name, cls_name, f"{cls_name}/raw", root, train, download)
        return TensorSource(
            name=name,
            split=split,
            images=ds.data,
            mean=(mean,),
            std=(std,),
            num_classes=len(ds.classes),
            resize=resize,
        )

    return load


def torchvision_cifar(
    cls_name: str, folder: str, mean: tuple[float, ...], std: tuple[float, ...]
) -> Callable[..., Source]:
    """Loader for CIFAR-10 / CIFAR-100 (torchvision's python-pickle batches under ``folder``)."""

    def load(name: str, split: str, root: Path, download: bool, options: Mapping) -> Source:
        check_option_names(name, options, ("resize",))
        resize = int_option(name, options, "resize", 1) if "resize" in options else None
        train = _train_flag(name, split)
        ds = _open_torchvision(name, cls_name, folder, root, train, download)
        images = torch.from_numpy(ds.data).permute(0, 3, 1, 2)  # (N, H, W, C) -> (N, C, H, W)
        return TensorSource(
            name=name,
            split=split,
            images=images,
            mean=mean,
            std=std,
            num_classes=len(ds.classes),
            resize=resize,
        )

    return load
