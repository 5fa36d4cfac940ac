"""Sources: the split of a dataset a pass reads, its specification, shards and limits."""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

from .. import batches as B
from ..errors import ConfigError, DataError

DEFAULT_ROOT = "data"
ROOT_ENV = "LSUV_DATA_ROOT"


class _Options(dict):
    """A read-only dict of JSON values that hashes by content: the options of a frozen spec.

    Nested lists are stored as tuples (JSON writes them back as lists), so nothing inside can
    change under the spec's hash. It pickles and serializes to JSON like a plain dict.
    """

    __slots__ = ()

    def __hash__(self) -> int:
        return hash(json.dumps(self, sort_keys=True))

    def __reduce__(self):
        return (_Options, (dict(self),))

    def _read_only(self, *args, **kwargs):
        raise TypeError("dataset options are read-only; use dataclasses.replace(spec, options=...)")

    __setitem__ = __delitem__ = __ior__ = _read_only
    clear = pop = popitem = setdefault = update = _read_only


def _freeze(value):
    if isinstance(value, dict):
        return _Options((k, _freeze(v)) for k, v in value.items())
    if isinstance(value, list):
        return tuple(_freeze(v) for v in value)
    return value


@dataclass(frozen=True, kw_only=True)
class DatasetSpec:
    """Which samples a run reads: a named dataset, split, limit and options under a root.

    Attributes:
        name: A key of :data:`DATASETS` (e.g. ``"mnist"``) or ``"imagefolder:PATH"``.
        split: ``"train"`` or ``"test"`` (image folders also take ``"val"``).
        root: Folder holding the dataset in torchvision's layout.
        limit: Use only the first ``limit`` samples of the split, in dataset order.
        sample: Then use ``sample`` samples drawn uniformly without replacement
            (:func:`sampled`), under ``sample_seed``.
        sample_seed: The seed of that draw.
        download: Fetch the files when they are missing.
        options: The dataset's own settings, JSON values (e.g. ``{"resize": 128}`` for an
            image folder); stored read-only, with lists as tuples, so the spec stays hashable.
    """

    name: str
    split: str = "train"
    root: str = DEFAULT_ROOT
    limit: int | None = None
    download: bool = True
    options: Mapping = field(default_factory=dict)
    sample: int | None = None
    sample_seed: int = 0

    def __post_init__(self) -> None:
        if not isinstance(self.options, Mapping):
            raise ConfigError(
                f"dataset options must be a mapping, got {type(self.options).__name__}"
            )
        try:  # a JSON round trip: what the store records is what the loader sees
            plain = json.loads(json.dumps(dict(self.options), sort_keys=True, allow_nan=False))
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"dataset options must be JSON values ({exc})") from None
        object.__setattr__(self, "options", _freeze(plain))

    def to_dict(self) -> dict:
        d = asdict(self)
        if self.sample is None:  # specs recorded before samples existed stay the same
            del d["sample"], d["sample_seed"]
        return d

    @classmethod
    def from_dict(cls, d: dict) -> DatasetSpec:
        return cls(**d)

    def key(self) -> str:
        """Return the spec as canonical JSON: a stable cache key across processes."""
        return json.dumps(self.to_dict(), sort_keys=True)


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
    #: Threads that load its batches (``loading.py``; 0: the calling thread). Not part of
    #: the data: it changes no byte of a batch, nor the fingerprint.
    loader_workers: int = 0
    #: Whether a caller's Dataset's items may be read on several threads at once.
    callers_items: bool = False

    def batch(self, start: int, stop: int) -> torch.Tensor:
        """Return samples ``[start, stop)`` preprocessed, as one float32 batch."""
        raise NotImplementedError

    def raw_batch(self, start: int, stop: int):
        """Samples ``[start, stop)`` as a process keeps them between passes: the batch
        before its last, cheap steps (an image folder's uint8 pixels, before ``x / 255``
        and the normalization, a quarter of the float bytes); by default the batch itself.
        ``from_raw(raw_batch(a, b))`` is ``batch(a, b)``, byte for byte."""
        return self.batch(start, stop)

    def from_raw(self, raw):
        """The batch of a :meth:`raw_batch`."""
        return raw

    def shards(self, shard_size: int) -> list[Shard]:
        """Split the source into the fixed shards of a pass (see :func:`shards`)."""
        return shards(self.count, shard_size)

    def batch_ranges(self, shard: Shard, batch_size: int) -> list[tuple[int, int]]:
        """Return the ``[start, stop)`` ranges :meth:`batches` reads for ``shard``."""
        return batches(shard, batch_size)

    def batches(self, shard: Shard, batch_size: int) -> Iterator[torch.Tensor]:
        """Yield the shard's samples in order, ``batch_size`` at a time."""
        for start, stop in self.batch_ranges(shard, batch_size):
            yield self.batch(start, stop)

    def set_loader_workers(self, workers: int, *, callers_items: bool = False) -> Source:
        """Load with ``workers`` threads (0: in the calling thread); return the source.

        ``callers_items``: a caller's own Dataset may have its ``__getitem__`` called from
        several threads at once (asked for explicitly: not every Dataset is thread-safe).
        """
        self.loader_workers = workers
        self.callers_items = callers_items
        inner = getattr(self, "inner", None)  # a view: its source decodes
        if isinstance(inner, Source):
            inner.set_loader_workers(workers, callers_items=callers_items)
        return self

    def reopen_options(self) -> dict:
        """Options that let :func:`open_source` reopen this source without repeating work."""
        return {}

    def describe(self) -> dict:
        """Return what the store records about this source."""
        return {
            "name": self.name,
            "split": self.split,
            "count": self.count,
            "sample_shape": jsonable_shape(self.sample_shape),
            "num_classes": self.num_classes,
            "fingerprint": self.fingerprint,
            "transform": self.transform,
        }


def jsonable_shape(shape):
    """A sample shape as JSON: a list, or the batch's structure (dict, list) of lists."""
    if isinstance(shape, tuple) and all(isinstance(d, int) for d in shape):
        return list(shape)
    if isinstance(shape, dict):
        return {str(k): jsonable_shape(v) for k, v in shape.items()}
    return [jsonable_shape(v) for v in shape]


def normalize_images(images: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """``(x / 255 - mean) / std`` in float32: torchvision's ``ToTensor`` then ``Normalize``."""
    x = images.to(torch.float32).div(255)  # (N, C, H, W)
    return x.sub_(mean).div_(std)


class TensorSource(Source):
    """A split held in memory as raw uint8 images, normalized per batch.

    ``batch`` computes ``(x / 255 - mean) / std`` per channel in float32, the same
    operations as torchvision's ``ToTensor()`` followed by ``Normalize(mean, std)``. With
    ``resize``, the float images are first resized to ``resize x resize`` (bilinear, with
    antialiasing), e.g. to give 28x28 digits the 32x32 that VGG's five poolings need.
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
        resize: int | None = None,
    ) -> None:
        if images.dtype != torch.uint8:
            raise TypeError(f"expected uint8 images, got {images.dtype}")
        if images.ndim == 3:
            images = images.unsqueeze(1)  # (N, H, W) -> (N, 1, H, W)
        self.name = name
        self.split = split
        self.images = images.contiguous()  # (N, C, H, W) uint8
        self.count = images.shape[0]
        self.resize = resize
        size = (resize, resize) if resize else tuple(images.shape[2:])
        self.sample_shape = (images.shape[1], *size)
        self.num_classes = num_classes
        channels = self.sample_shape[0]
        self._mean = torch.tensor(mean, dtype=torch.float32).view(channels, 1, 1)
        self._std = torch.tensor(std, dtype=torch.float32).view(channels, 1, 1)
        self.transform = {
            "to_float": "x / 255",
            "normalize": {"mean": list(mean), "std": list(std)},
        }
        if resize:
            self.transform["resize"] = {"size": resize, "mode": "bilinear", "antialias": True}
        self.fingerprint = _fingerprint(self.images, self.transform)

    def batch(self, start: int, stop: int) -> torch.Tensor:
        if not self.resize:
            return normalize_images(self.images[start:stop], self._mean, self._std)
        x = self.images[start:stop].to(torch.float32).div(255)
        x = torch.nn.functional.interpolate(
            x, size=(self.resize, self.resize), mode="bilinear", antialias=True
        )
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
        from_env = root is None or str(root) == os.environ.get(ROOT_ENV)
        how = f"${ROOT_ENV}" if from_env else "--data-root"
        raise DataError(f"data root {str(path)!r} (from {how}) is not a directory")
    return path


# -- options -------------------------------------------------------------------------


def check_option_names(name: str, options: Mapping, known: Iterable[str]) -> None:
    known = sorted(known)
    unknown = sorted(set(options) - set(known))
    if not unknown:
        return
    if not known:
        raise ConfigError(f"dataset {name!r} takes no options, got: {', '.join(unknown)}")
    raise ConfigError(
        f"unknown option(s) for dataset {name!r}: {', '.join(unknown)}; "
        f"known: {', '.join(k for k in known if not k.startswith('_'))}"  # _name: internal
    )


def int_option(name: str, options: Mapping, key: str, default: int) -> int:
    value = options.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(
            f"option {key!r} of dataset {name!r} must be an integer >= 1, got {value!r}"
        )
    return value


def floats_option(name: str, options: Mapping, key: str, channels: int) -> tuple[float, ...]:
    value = options[key]
    ok = isinstance(value, (list, tuple)) and len(value) == channels
    ok = ok and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)
    ok = ok and all(math.isfinite(v) for v in value)
    if not ok or (key == "std" and min(value) <= 0):
        what = "positive numbers" if key == "std" else "finite numbers"
        raise ConfigError(
            f"option {key!r} of dataset {name!r} must be a list of {channels} {what} "
            f"(one per channel), got {value!r}"
        )
    return tuple(float(v) for v in value)


# -- limits --------------------------------------------------------------------------


def limited(source: Source, limit: int | None) -> Source:
    """Return the first ``limit`` samples of ``source``, in its order (``None``: all).

    The view reads the same bytes as ``source`` for those samples, keeps its shard and batch
    structure (cut at ``limit``), and has a fingerprint of its own. A limit at or above the
    count returns ``source`` itself.

    Raises:
        ConfigError: ``limit`` below 1.
    """
    if limit is None:
        return source
    if limit < 1:
        raise ConfigError(f"--limit must be at least 1, got {limit}")
    if limit >= source.count:
        return source
    view = _Limited(source, limit)
    if source.spec is not None:
        view.spec = replace(source.spec, limit=limit)
    return view


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

    def raw_batch(self, start: int, stop: int):
        return self.inner.raw_batch(start, min(stop, self.count))

    def from_raw(self, raw):
        return self.inner.from_raw(raw)

    def shards(self, shard_size: int) -> list[Shard]:
        cut = (
            Shard(s.index, s.start, min(s.stop, self.count)) for s in self.inner.shards(shard_size)
        )
        return [s for s in cut if s.start < s.stop]

    def batch_ranges(self, shard: Shard, batch_size: int) -> list[tuple[int, int]]:
        if shard.start >= self.count:
            return []
        cut = Shard(shard.index, shard.start, min(shard.stop, self.count))
        return [(a, min(b, self.count)) for a, b in self.inner.batch_ranges(cut, batch_size)]


def _limited_fingerprint(inner: Source, count: int) -> str:
    if isinstance(inner, TensorSource):
        return _fingerprint(inner.images[:count], inner.transform)
    h = hashlib.sha256(f"{inner.fingerprint}[:{count}]".encode())
    return "sha256:" + h.hexdigest()


# -- samples -------------------------------------------------------------------------


def sampled(source: Source, n: int | None, seed: int = 0) -> Source:
    """Return ``n`` samples of ``source`` drawn uniformly without replacement (``None``: all).

    The draw is ``torch.randperm`` under its own generator seeded with ``seed``, fixed
    before sharding and read in dataset order; the view has a fingerprint of its own (the
    source's, the count and the seed). Unlike :func:`limited` (the first ``n``), a sample
    of a class-sorted split holds every class in proportion.

    Raises:
        ConfigError: ``n`` below 1.
    """
    if n is None:
        return source
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ConfigError(f"--sample must be a positive integer, got {n!r}")
    if n >= source.count:
        return source
    view = _Sampled(source, n, seed)
    if source.spec is not None:
        view.spec = replace(source.spec, sample=n, sample_seed=seed)
    return view


class _Sampled(Source):
    """``n`` samples of another source drawn under ``seed``, in dataset order."""

    def __init__(self, inner: Source, n: int, seed: int) -> None:
        self.inner = inner
        self.name = inner.name
        self.split = inner.split
        self.count = n
        self.sample_shape = inner.sample_shape
        self.num_classes = inner.num_classes
        self.transform = {**inner.transform, "sample": {"count": n, "seed": seed,
                                                        "of": inner.count}}  # fmt: skip
        drawn = torch.randperm(inner.count, generator=torch.Generator().manual_seed(seed))
        self.indices = drawn[:n].sort().values
        h = hashlib.sha256(f"{inner.fingerprint}:sample {n} seed {seed}".encode())
        self.fingerprint = "sha256:" + h.hexdigest()

    def batch(self, start: int, stop: int):
        picked = self.indices[start : min(stop, self.count)].tolist()
        if not picked:
            return self.inner.batch(0, 0)
        return B.cat([self.inner.batch(a, b) for a, b in _runs(picked)])

    def raw_batch(self, start: int, stop: int):
        picked = self.indices[start : min(stop, self.count)].tolist()
        if not picked:
            return self.inner.raw_batch(0, 0)
        return B.cat([self.inner.raw_batch(a, b) for a, b in _runs(picked)])

    def from_raw(self, raw):
        return self.inner.from_raw(raw)


def _runs(picked: list[int]) -> list[list[int]]:
    """Sorted indices as ``[start, stop)`` runs of consecutive ones, each read as one range."""
    runs: list[list[int]] = []
    for i in picked:
        if runs and runs[-1][1] == i:
            runs[-1][1] = i + 1
        else:
            runs.append([i, i + 1])
    return runs


# -- shards --------------------------------------------------------------------------


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
