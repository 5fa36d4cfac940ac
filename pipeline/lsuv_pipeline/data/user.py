"""A user's own data through the Python API: a map-style Dataset or sized batches."""

from __future__ import annotations

import bisect
import hashlib
import itertools
import json
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping

import torch
from torch.utils.data import (
    DataLoader,
    Dataset,
    IterableDataset,
    RandomSampler,
    SubsetRandomSampler,
    WeightedRandomSampler,
    default_collate,
)

from .. import batches as B
from ..errors import ConfigError, DataError
from .base import Shard, Source, jsonable_shape
from .loading import ordered_map

# -- user data -----------------------------------------------------------------------

#: Samples a spot-check fingerprint reads, evenly spaced from the first to the last.
SPOT_CHECK = 64


def source_from(
    data,
    *,
    name: str = "user",
    split: str = "train",
    fingerprint: str | None = None,
    collate: Callable | None = None,
    whole: bool = False,
) -> Source:
    """Wrap a user's own data as a :class:`Source` (spec ``None``: it travels by pickling).

    ``data`` is one of:

    * a :class:`Source`: returned as is;
    * a map-style ``torch.utils.data.Dataset`` (``__len__`` and ``__getitem__``): random
      access, ``batch(start, stop)`` reads items ``start..stop-1``. An item is a tensor, a
      dict of tensors, or a tuple whose first element is the input (``(x, y)``: ``x`` is
      taken). ``collate(items)``, if given, turns the list of items as the dataset returns
      them into the batch; by default they are stacked (``default_collate``);
    * any other sized, re-iterable collection of batches, each a tensor ``(B, ...)``, a dict
      of tensors or a tuple starting with the input: a ``DataLoader`` without shuffling, a
      list of tensors, a list of ``(x, y)`` pairs. ``collate(batch)``, if given, maps each
      yielded batch to the model's input. See :class:`_BatchesSource` for what sequential
      access implies.

    A batch is what ``batches.call`` hands the model: a tensor, or a dict of tensors (given
    as keyword arguments). With ``whole=True`` (a caller's ``forward_fn``) tuples are kept
    whole too, labels included. Integer tensors (token ids) stay integer.

    Only ``Dataset`` instances are read item by item; anything else is taken as batches, so a
    plain list of single-sample tensors would be misread (wrap it in a ``TensorDataset``).
    Prefer passing a ``Dataset`` over a ``DataLoader`` of it: random access, no counting pass.
    Floating-point tensors are cast to float32; preprocessing is the data's own business,
    done before it gets here. The source is shipped to dask workers by
    pickling, so ``data`` and ``collate`` must pickle for a cluster run.

    Args:
        data: The samples, as above.
        name: Name recorded for the dataset.
        split: Split name recorded for it (e.g. ``"test"`` for a held-out set).
        fingerprint: Identity of the data, recorded and compared on resume; by default a
            sha256 spot check (see below), which does not see changes between the samples
            it reads: give your own (e.g. a data version) when that matters.
        collate: As above.
        whole: Keep tuple batches whole (for a ``forward_fn``) instead of their first element.

    The default fingerprint hashes the number of samples, ``data``'s type name, the batch
    sizes (iterables) and the bytes of at most :data:`SPOT_CHECK` preprocessed samples
    evenly spaced from the first to the last (for an iterable: the first sample of evenly
    spaced batches, plus the very last sample). It is a spot check, not a hash of all data.

    Raises:
        ConfigError: An unsized iterable, a one-shot iterator, a shuffling ``DataLoader``,
            an ``IterableDataset``, or batches that are not tensors (or dicts, tuples of them).
        DataError: ``data`` holds no samples.
    """
    if isinstance(data, Source):
        return data
    if fingerprint is not None and (not isinstance(fingerprint, str) or not fingerprint):
        raise ConfigError(f"fingerprint must be a non-empty string, got {fingerprint!r}")
    if isinstance(data, IterableDataset):
        raise ConfigError(
            f"{_type_name(data)} is an IterableDataset, read one sample at a time without "
            "random access; wrap it in a DataLoader(batch_size=...) without shuffling"
        )
    if isinstance(data, Dataset):
        return _DatasetSource(
            data, name=name, split=split, fingerprint=fingerprint, collate=collate, whole=whole
        )
    return _BatchesSource(
        data, name=name, split=split, fingerprint=fingerprint, collate=collate, whole=whole
    )


def _type_name(obj) -> str:
    return f"{type(obj).__module__}.{type(obj).__qualname__}"


def _input(value, whole: bool):
    """The model's input in an item or batch: a tensor or mapping as it is, the first
    element of a tuple / list (``(x, y)``), or the whole value when ``whole``."""
    if whole or isinstance(value, (torch.Tensor, Mapping)):
        return value
    if isinstance(value, (tuple, list)) and len(value) > 0:
        return value[0]
    return value


def _as_batch(value, what: str, whole: bool):
    """The host batch in ``value`` (see :func:`_input` and ``batches.check``)."""
    try:
        return B.check(_input(value, whole), what)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None


#: Data that reads differently each time cannot be solved on: every pass must see the
#: same samples.
_CHANGED = (
    "{what} gave other values for its first samples than when it was opened: the data "
    "changes between passes (a random augmentation in its transform, or an iterable that "
    "yields something else each time), and LSUV needs the same samples in every pass; "
    "pass the data without augmentation (e.g. the test-time transform)"
)


def _digest(batch) -> str:
    h = hashlib.sha256()
    B.hash_into(h, batch)
    return h.hexdigest()


def _spot_indices(n: int) -> list[int]:
    """At most :data:`SPOT_CHECK` indices evenly spaced over ``range(n)``, first and last in."""
    if n <= SPOT_CHECK:
        return list(range(n))
    return sorted({round(j * (n - 1) / (SPOT_CHECK - 1)) for j in range(SPOT_CHECK)})


class _DatasetSource(Source):
    """A map-style dataset: random access, items collated per batch (see :func:`source_from`)."""

    def __init__(self, data, *, name, split, fingerprint, collate, whole) -> None:
        self.data = data
        self.collate = collate
        self.whole = whole
        self.name = name
        self.split = split
        self.count = len(data)
        if self.count == 0:
            raise DataError(f"dataset {name!r} ({_type_name(data)}) has no samples")
        first = self._collated(0, 1)
        self.sample_shape = B.sample_shape(first)
        self._first = _digest(first)
        classes = getattr(data, "classes", None)
        self.num_classes = len(classes) if isinstance(classes, (list, tuple)) else None
        self.transform = {
            "user": {
                "kind": "dataset",
                "type": _type_name(data),
                "collate": B.callable_name(collate) if collate else "torch.stack of the samples",
            }
        }
        self.fingerprint = fingerprint or self._spot_check()

    def _collated(self, start: int, stop: int) -> torch.Tensor:
        # several threads in the caller's __getitem__ only when asked: it may not be
        # thread-safe (an open h5py or LMDB handle); by default one reads ahead of the model
        workers = self.loader_workers if self.callers_items else 0
        items = ordered_map(self.data.__getitem__, range(start, stop), workers)
        what = f"dataset {self.name!r} items {start}..{stop - 1}"
        if self.collate is not None:
            return _as_batch(self.collate(items), what, self.whole)
        inputs = [_input(item, self.whole) for item in items]
        if all(isinstance(x, torch.Tensor) for x in inputs):
            return _as_batch(torch.stack(inputs), what, True)
        try:
            return _as_batch(default_collate(inputs), what, True)
        except (TypeError, RuntimeError) as exc:
            raise ConfigError(f"{what} do not stack into a batch ({exc}); pass collate=") from None

    def batch(self, start: int, stop: int):
        stop = min(stop, self.count)
        if start >= stop:
            return B.empty_like(self.sample_shape)
        x = self._collated(start, stop)
        if start == 0 and _digest(B.take(x, 0, 1)) != self._first:
            raise DataError(
                _CHANGED.format(what=f"dataset {self.name!r} ({_type_name(self.data)})")
            )
        if B.size(x) != stop - start or B.sample_shape(x) != self.sample_shape:
            raise DataError(
                f"dataset {self.name!r} items {start}..{stop - 1} collate to {B.size(x)} "
                f"samples of shape {B.sample_shape(x)}, expected {stop - start} of "
                f"{self.sample_shape}"
            )
        return x

    def _spot_check(self) -> str:
        h = hashlib.sha256()
        head = {"kind": "dataset", "type": _type_name(self.data), "count": self.count}
        h.update(json.dumps({**head, "sample_shape": jsonable_shape(self.sample_shape)}).encode())
        for i in _spot_indices(self.count):
            h.update(f"{i}:".encode())
            B.hash_into(h, self.batch(i, i + 1))
        return "sha256:" + h.hexdigest()


class _BatchesSource(Source):
    """A sized, re-iterable collection of batches: sequential access only.

    Opening it iterates once to read every batch's size (``count`` is their sum) and to take
    the spot-check fingerprint; the batch layout is then fixed, and a later iteration that
    yields other sizes is a :class:`DataError`.

    Shards and batches follow the iterable's own batches: :meth:`shards` groups whole
    consecutive batches, as many as fit in ``shard_size`` samples (at least one), and
    :meth:`batches` yields the iterable's batches as they are, ignoring the caller's
    ``batch_size``. Shards cut elsewhere (e.g. by :func:`shards`) still work: a batch that
    straddles a shard boundary is split there, so every sample is read exactly once.

    ``batch(start, stop)`` iterates from the start, keeping a cursor: requests in increasing
    order (one pass, shard after shard) continue the same iteration at no extra cost; a
    request behind the cursor starts a new iteration and skips the batches before it, which
    re-reads them (a dask worker given shards out of order pays this). ``iterations``
    counts the iterations started after opening.
    """

    def __init__(self, data, *, name, split, fingerprint, collate, whole) -> None:
        try:
            batches_count = len(data)
        except TypeError:
            raise ConfigError(
                f"{_type_name(data)} has no len(): only a sized, re-iterable collection of "
                "batches (a DataLoader, a list) can be read the same way every pass"
            ) from None
        if isinstance(data, Iterator):
            raise ConfigError(
                f"{_type_name(data)} is an iterator, which can be read only once; pass a "
                "re-iterable collection (a DataLoader, a list)"
            )
        if not isinstance(data, Iterable) and not hasattr(data, "__getitem__"):
            raise ConfigError(f"{_type_name(data)} is neither a Dataset nor iterable")
        if isinstance(data, DataLoader) and shuffles(data):
            raise ConfigError(
                "the DataLoader shuffles (a random sampler), so every pass would read another "
                "order; build it with shuffle=False, or call lsuv_pipeline.lsuv_, which reads "
                "a shuffling loader in a fixed order"
            )
        self.data = data
        self.collate = collate
        self.whole = whole
        self.name = name
        self.split = split
        self.iterations = 0
        self._reset()
        spot = _spot_indices(batches_count)
        h = hashlib.sha256()
        sizes: list[int] = []
        first_shape = x = None
        for i, raw in enumerate(data):
            x = self._tensor(raw, i)
            if first_shape is None:
                first_shape = B.sample_shape(x)
            elif B.sample_shape(x) != first_shape:
                raise ConfigError(
                    f"batch {i} of {name!r} has samples of shape {B.sample_shape(x)}, "
                    f"batch 0 has {first_shape}"
                )
            sizes.append(B.size(x))
            if i == 0:
                self._first = _digest(x)
            if i in spot:
                h.update(f"{i}:".encode())
                B.hash_into(h, B.take(x, 0, 1))
        if not sizes:
            raise DataError(f"dataset {name!r} ({_type_name(data)}) yields no batches")
        B.hash_into(h, B.take(x, sizes[-1] - 1, sizes[-1]))
        self._offsets = [0, *itertools.accumulate(sizes)]  # batch i is [offsets[i], offsets[i+1])
        self.count = self._offsets[-1]
        self.sample_shape = first_shape
        classes = getattr(getattr(data, "dataset", data), "classes", None)
        self.num_classes = len(classes) if isinstance(classes, (list, tuple)) else None
        self.transform = {
            "user": {
                "kind": "batches",
                "type": _type_name(data),
                "collate": B.callable_name(collate) if collate else "first element of each batch",
            }
        }
        head = {"kind": "batches", "type": _type_name(data), "count": self.count, "sizes": sizes}
        h.update(json.dumps({**head, "sample_shape": jsonable_shape(first_shape)}).encode())
        self.fingerprint = fingerprint or "sha256:" + h.hexdigest()

    def _reset(self) -> None:
        self._lock = threading.Lock()  # dask worker threads may share one source
        self._it: Iterator | None = None
        self._pos = 0  # batches the current iteration has yielded
        self._last: tuple[int, object] | None = None

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        for key in ("_lock", "_it", "_pos", "_last"):
            del state[key]
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._reset()

    def _tensor(self, raw, index: int):
        value = self.collate(raw) if self.collate is not None else raw
        x = _as_batch(value, f"batch {index} of {self.name!r}", self.whole)
        if B.size(x) == 0:
            raise ConfigError(f"batch {index} of {self.name!r} is empty")
        return x

    def _fetch(self, index: int):
        """Batch ``index`` of the iterable, continuing the current iteration when possible."""
        with self._lock:
            if self._last is not None and self._last[0] == index:
                return self._last[1]
            if self._it is None or index < self._pos:
                self._it, self._pos = iter(self.data), 0
                self.iterations += 1
            try:
                while self._pos < index:
                    raw = next(self._it)
                    if self._pos == 0:  # each iteration's first batch: is it the same?
                        self._same_first(self._tensor(raw, 0))
                    self._pos += 1
                x = self._tensor(next(self._it), index)
                if index == 0:
                    self._same_first(x)
            except StopIteration:
                raise DataError(
                    f"{self.name!r} yielded fewer batches than the {len(self._offsets) - 1} it "
                    "had when opened"
                ) from None
            self._pos += 1
            expected = self._offsets[index + 1] - self._offsets[index]
            if B.size(x) != expected:
                raise DataError(
                    f"batch {index} of {self.name!r} has {B.size(x)} samples, {expected} when "
                    "opened: the data changed between passes"
                )
            self._last = (index, x)
            return x

    def _same_first(self, x) -> None:
        if _digest(x) != self._first:
            raise DataError(_CHANGED.format(what=f"{self.name!r} ({_type_name(self.data)})"))

    def batch(self, start: int, stop: int):
        stop = min(stop, self.count)
        if start >= stop:
            return B.empty_like(self.sample_shape)
        first = bisect.bisect_right(self._offsets, start) - 1
        end = bisect.bisect_left(self._offsets, stop)  # batches [first, end) overlap the range
        pieces = []
        for i in range(first, end):
            lo = self._offsets[i]
            a, b = max(start, lo) - lo, min(stop, self._offsets[i + 1]) - lo
            pieces.append(B.take(self._fetch(i), a, b))
        return B.cat(pieces)  # a new batch: callers never share the cursor's batch

    def shards(self, shard_size: int) -> list[Shard]:
        if shard_size < 1:
            raise ConfigError(f"shard size must be at least 1, got {shard_size}")
        out, start = [], 0
        for lo, hi in itertools.pairwise(self._offsets):
            if hi - start > shard_size and lo > start:  # batch lo..hi does not fit: close
                out.append(Shard(len(out), start, lo))
                start = lo
        out.append(Shard(len(out), start, self.count))
        return out

    def batch_ranges(self, shard: Shard, batch_size: int) -> list[tuple[int, int]]:
        first = bisect.bisect_right(self._offsets, shard.start) - 1
        ranges = []
        for i in range(max(first, 0), len(self._offsets) - 1):
            lo, hi = self._offsets[i], self._offsets[i + 1]
            if lo >= shard.stop:
                break
            a, b = max(lo, shard.start), min(hi, shard.stop, self.count)
            if a < b:
                ranges.append((a, b))
        return ranges


def shuffles(loader) -> bool:
    """Whether a ``DataLoader`` draws its order at random."""
    random = (RandomSampler, SubsetRandomSampler, WeightedRandomSampler)
    samplers = [loader.sampler, getattr(loader.batch_sampler, "sampler", None)]
    return any(isinstance(s, random) or getattr(s, "shuffle", False) is True for s in samplers)
