"""Datasets by name, their preprocessing, fixed shards, and the dataset fingerprint.

A :class:`Source` is one split of a dataset, addressed by index ranges:
``source.batch(start, stop)`` returns the preprocessed float32 batch of those samples, in
dataset order, the same bytes every time. A pass covers the split in fixed shards
(``source.shards(shard_size)``: contiguous ranges whose size does not depend on how many
workers run them), each read in batches, so every executor computes the same per-shard moments
and their merge in shard order gives the same bits.

Where sources come from:

* :func:`open_source` opens a :class:`DatasetSpec`: a name of :data:`DATASETS` (``mnist``,
  ``fashion-mnist``, ``cifar10``, ``cifar100``) or ``imagefolder:PATH``, a split, a limit and
  the dataset's options, under a data root. Any process (a dask worker included) reopens the
  same source from the spec.
* :func:`source_from` wraps a user's own data given through the Python API: a map-style
  ``torch.utils.data.Dataset`` or a sized, re-iterable sequence of batches (a ``DataLoader``
  without shuffling, a list of tensors). Such sources have no spec; they travel by pickling.
* :func:`limited` is the view of the first ``limit`` samples of any of them (``--limit``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

from ..errors import ConfigError, DataError, UnknownDataset
from .base import (
    DEFAULT_ROOT,
    ROOT_ENV,
    DatasetSpec,
    Shard,
    Source,
    TensorSource,
    batches,
    limited,
    resolve_root,
    sampled,
    shards,
)
from .folder import IMAGEFOLDER, load_imagefolder
from .user import source_from
from .vision import torchvision_cifar, torchvision_idx

__all__ = [
    "DATASETS",
    "DEFAULT_ROOT",
    "ROOT_ENV",
    "DatasetSpec",
    "Shard",
    "Source",
    "TensorSource",
    "batches",
    "limited",
    "open_source",
    "resolve_root",
    "sampled",
    "shards",
    "source_from",
]


# -- the registry ----------------------------------------------------------------------

#: Dataset name -> loader(name, split, root, download, options) -> Source. Normalization
#: constants are the training split's per-channel population mean / std of the pixel values
#: scaled to [0, 1]. MNIST's are the customary ones (PyTorch's examples/mnist). CIFAR's are
#: np.mean / np.std (ddof=0) of ``train_data / 255`` over all pixels and images, to 8
#: places, as widely published (CIFAR-100: weiaicunzai/pytorch-cifar100,
#: conf/global_settings.py). They are NOT the often copied CIFAR-10 std (0.2023, 0.1994,
#: 0.2010), which averages per-image stds. ``imagefolder:PATH`` is
#: :func:`load_imagefolder`.
DATASETS: dict[str, Callable[..., Source]] = {
    "mnist": torchvision_idx("MNIST", 0.1307, 0.3081),
    "fashion-mnist": torchvision_idx("FashionMNIST", 0.2860, 0.3530),
    "cifar10": torchvision_cifar(
        "CIFAR10",
        "cifar-10-batches-py",
        mean=(0.49139968, 0.48215841, 0.44653091),
        std=(0.24703223, 0.24348513, 0.26158784),
    ),
    "cifar100": torchvision_cifar(
        "CIFAR100",
        "cifar-100-python",
        mean=(0.50707516, 0.48654887, 0.44091784),
        std=(0.26733429, 0.25643846, 0.27615047),
    ),
    IMAGEFOLDER: load_imagefolder,
}


def _loader(name: str) -> Callable[..., Source]:
    prefix, colon, _ = name.partition(":")
    loader = DATASETS.get(prefix) if colon else DATASETS.get(name)
    if loader is None or (colon and prefix != IMAGEFOLDER):
        names = sorted(k + ":PATH" if k == IMAGEFOLDER else k for k in DATASETS)
        raise UnknownDataset(f"unknown dataset {name!r}; choose one of: {', '.join(names)}")
    return loader


def open_source(spec: DatasetSpec) -> Source:
    """Open the split ``spec`` describes, downloading it if allowed and missing.

    The source's ``spec`` is ``spec``, plus any option that spares a reopening the work this
    opening did (an image folder's computed statistics, checked against its files).

    Raises:
        DataError: Unknown dataset, missing files, or a failed download.
        ConfigError: Unknown split, bad options, or a limit below 1.
    """
    loader = _loader(spec.name)
    if spec.limit is not None and spec.limit < 1:
        raise ConfigError(f"--limit must be at least 1, got {spec.limit}")
    source = loader(spec.name, spec.split, Path(spec.root), spec.download, spec.options)
    if source.count == 0:
        raise DataError(f"dataset {spec.name!r} split {spec.split!r} has no samples")
    extra = source.reopen_options()
    source = sampled(limited(source, spec.limit), spec.sample, spec.sample_seed)
    source.spec = replace(spec, options={**spec.options, **extra}) if extra else spec
    return source
