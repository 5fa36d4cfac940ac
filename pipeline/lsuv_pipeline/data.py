"""Datasets by name, their preprocessing, fixed shards, and the dataset fingerprint.

A :class:`Source` is one split of a dataset, decoded once and addressed by index ranges:
``source.batch(start, stop)`` returns the preprocessed float32 batch of those samples, in
dataset order. A pass covers the split in fixed :func:`shards` (contiguous ranges whose size
does not depend on how many workers run them), each read in batches, so every executor
computes the same per-shard moments and their merge in shard order gives the same bits.

A :class:`DatasetSpec` is the small, picklable description from which any process (a dask
worker included) opens the same source from the data root.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import sys
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from .errors import ConfigError, DataError

__all__ = [
    "DATASETS",
    "DatasetSpec",
    "Shard",
    "Source",
    "TensorSource",
    "batches",
    "open_source",
    "resolve_root",
    "shards",
]

DEFAULT_ROOT = "data"
ROOT_ENV = "LSUV_DATA_ROOT"


@dataclass(frozen=True, kw_only=True)
class DatasetSpec:
    """Which samples a run reads: a named dataset, split and optional limit under a root.

    Attributes:
        name: A key of :data:`DATASETS`, e.g. ``"mnist"``.
        split: ``"train"`` or ``"test"``.
        root: Folder holding the dataset in torchvision's layout.
        limit: Use only the first ``limit`` samples of the split, in dataset order.
        download: Fetch the files when they are missing.
    """

    name: str
    split: str = "train"
    root: str = DEFAULT_ROOT
    limit: int | None = None
    download: bool = True

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> DatasetSpec:
        return cls(**d)


@dataclass(frozen=True)
class Shard:
    """A contiguous range ``[start, stop)`` of sample indices, the unit of work of a pass."""

    index: int
    start: int
    stop: int

    def __len__(self) -> int:
        return self.stop - self.start


class Source:
    """One split of a dataset, preprocessed on demand, addressed by index ranges."""

    name: str
    split: str
    count: int
    sample_shape: tuple[int, ...]
    num_classes: int | None
    fingerprint: str
    transform: dict
    #: How another process opens the same source (``None``: only by pickling this object).
    spec: DatasetSpec | None = None

    def batch(self, start: int, stop: int) -> torch.Tensor:
        """Return samples ``[start, stop)`` preprocessed, as one float32 batch."""
        raise NotImplementedError

    def batches(self, shard: Shard, batch_size: int) -> Iterator[torch.Tensor]:
        """Yield the shard's samples in order, ``batch_size`` at a time."""
        for start, stop in batches(shard, batch_size):
            yield self.batch(start, stop)

    def describe(self) -> dict:
        """Return what the store records about this source."""
        return {
            "name": self.name,
            "split": self.split,
            "count": self.count,
            "sample_shape": list(self.sample_shape),
            "num_classes": self.num_classes,
            "fingerprint": self.fingerprint,
            "transform": self.transform,
        }


class TensorSource(Source):
    """A split held in memory as raw uint8 images, normalized per batch.

    ``batch`` computes ``(x / 255 - mean) / std`` per channel in float32, the same
    operations as torchvision's ``ToTensor()`` followed by ``Normalize(mean, std)``.
    """

    def __init__(
        self,
        *,
        name: str,
        split: str,
        images: torch.Tensor,
        mean: tuple[float, ...],
        std: tuple[float, ...],
        num_classes: int | None = None,
    ) -> None:
        if images.dtype != torch.uint8:
            raise TypeError(f"expected uint8 images, got {images.dtype}")
        if images.ndim == 3:
            images = images.unsqueeze(1)  # (N, H, W) -> (N, 1, H, W)
        self.name = name
        self.split = split
        self.images = images.contiguous()  # (N, C, H, W) uint8
        self.count = images.shape[0]
        self.sample_shape = tuple(images.shape[1:])
        self.num_classes = num_classes
        channels = self.sample_shape[0]
        self._mean = torch.tensor(mean, dtype=torch.float32).view(channels, 1, 1)
        self._std = torch.tensor(std, dtype=torch.float32).view(channels, 1, 1)
        self.transform = {
            "to_float": "x / 255",
            "normalize": {"mean": list(mean), "std": list(std)},
        }
        self.fingerprint = _fingerprint(self.images, self.transform)

    def batch(self, start: int, stop: int) -> torch.Tensor:
        x = self.images[start:stop].to(torch.float32).div(255)
        return x.sub_(self._mean).div_(self._std)


def _fingerprint(images: torch.Tensor, transform: dict) -> str:
    """sha256 over the sample bytes in order, their shape, and the preprocessing."""
    h = hashlib.sha256()
    h.update(json.dumps({"shape": list(images.shape), "transform": transform}).encode())
    h.update(images.numpy().tobytes())
    return "sha256:" + h.hexdigest()


def resolve_root(root: str | os.PathLike | None) -> Path:
    """Return the data root: ``root``, else ``$LSUV_DATA_ROOT``, else ``data/``.

    Raises:
        DataError: An explicitly given root (argument or environment) does not exist.
    """
    explicit = root if root is not None else os.environ.get(ROOT_ENV) or None
    if explicit is None:
        return Path(DEFAULT_ROOT)
    path = Path(explicit).expanduser()
    if not path.is_dir():
        how = "--data-root" if root is not None else f"${ROOT_ENV}"
        raise DataError(f"data root {str(path)!r} (from {how}) is not a directory")
    return path


@contextlib.contextmanager
def _stdout_to_stderr():
    """torchvision prints download progress to stdout; keep stdout for results."""
    with contextlib.redirect_stdout(sys.stderr):
        yield


def _torchvision_idx(cls_name: str, mean: float, std: float) -> Callable[..., Source]:
    """Loader for the MNIST-format datasets of torchvision (IDX files under raw/)."""

    def load(name: str, split: str, root: Path, download: bool) -> Source:
        import torchvision.datasets as tvd

        cls = getattr(tvd, cls_name)
        train = _train_flag(name, split)
        try:
            ds = cls(root=str(root), train=train, download=False)
        except RuntimeError:
            if not download:
                raise DataError(
                    f"{name} not found under {str(root / cls_name / 'raw')!r} and downloading is "
                    "off; point --data-root (or $LSUV_DATA_ROOT) at a folder that holds "
                    f"{cls_name}/raw"
                ) from None
            try:
                with _stdout_to_stderr():
                    ds = cls(root=str(root), train=train, download=True)
            except Exception as exc:
                reason = str(exc).strip().splitlines()[-1] if str(exc).strip() else repr(exc)
                raise DataError(
                    f"{name} not found under {str(root / cls_name / 'raw')!r} and the download "
                    f"failed ({reason}); point --data-root (or $LSUV_DATA_ROOT) at a folder "
                    f"that holds {cls_name}/raw"
                ) from None
        return TensorSource(
            name=name,
            split=split,
            images=ds.data,
            mean=(mean,),
            std=(std,),
            num_classes=len(ds.classes),
        )

    return load


def _train_flag(name: str, split: str) -> bool:
    if split not in ("train", "test"):
        raise ConfigError(f"dataset {name!r} has splits 'train' and 'test', not {split!r}")
    return split == "train"


#: Dataset name -> loader(name, split, root, download). Normalization constants are the
#: training-split mean / std of the pixel values scaled to [0, 1].
DATASETS: dict[str, Callable[..., Source]] = {
    "mnist": _torchvision_idx("MNIST", 0.1307, 0.3081),
    "fashion-mnist": _torchvision_idx("FashionMNIST", 0.2860, 0.3530),
}


class _Limited(Source):
    """The first ``limit`` samples of another source."""

    def __init__(self, inner: Source, limit: int) -> None:
        self.inner = inner
        self.name = inner.name
        self.split = inner.split
        self.count = min(limit, inner.count)
        self.sample_shape = inner.sample_shape
        self.num_classes = inner.num_classes
        self.transform = inner.transform
        self.fingerprint = _limited_fingerprint(inner, self.count)

    def batch(self, start: int, stop: int) -> torch.Tensor:
        return self.inner.batch(start, min(stop, self.count))


def _limited_fingerprint(inner: Source, count: int) -> str:
    if isinstance(inner, TensorSource):
        return _fingerprint(inner.images[:count], inner.transform)
    h = hashlib.sha256(f"{inner.fingerprint}[:{count}]".encode())
    return "sha256:" + h.hexdigest()


def open_source(spec: DatasetSpec) -> Source:
    """Open the split ``spec`` describes, downloading it if allowed and missing.

    Raises:
        DataError: Unknown dataset, missing files, or a failed download.
        ConfigError: Unknown split or a limit below 1.
    """
    loader = DATASETS.get(spec.name)
    if loader is None:
        raise DataError(
            f"unknown dataset {spec.name!r}; choose one of: {', '.join(sorted(DATASETS))}"
        )
    if spec.limit is not None and spec.limit < 1:
        raise ConfigError(f"--limit must be at least 1, got {spec.limit}")
    source = loader(spec.name, spec.split, Path(spec.root), spec.download)
    if source.count == 0:
        raise DataError(f"dataset {spec.name!r} split {spec.split!r} has no samples")
    if spec.limit is not None and spec.limit < source.count:
        source = _Limited(source, spec.limit)
    source.spec = spec
    return source


def shards(count: int, shard_size: int) -> list[Shard]:
    """Split ``range(count)`` into contiguous shards of ``shard_size`` (the last may be short)."""
    if shard_size < 1:
        raise ConfigError(f"shard size must be at least 1, got {shard_size}")
    return [
        Shard(i, start, min(start + shard_size, count))
        for i, start in enumerate(range(0, count, shard_size))
    ]


def batches(shard: Shard, batch_size: int) -> list[tuple[int, int]]:
    """Split a shard into ``[start, stop)`` batches of ``batch_size`` (the last may be short)."""
    return [
        (start, min(start + batch_size, shard.stop))
        for start in range(shard.start, shard.stop, batch_size)
    ]
