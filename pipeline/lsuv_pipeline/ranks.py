"""Inside a ``torch.distributed`` job: every rank computes a share, every rank the result.

::

    torchrun --nproc-per-node 2 train.py        # every rank calls lsuv_(model, data)

When :func:`~lsuv_pipeline.compute` or :func:`~lsuv_pipeline.lsuv_` runs in every rank
of an initialized process group of more than one rank (a ``torchrun`` job, DDP,
Lightning), the ranks work as one run:

- They agree first (:func:`agree`): the same configuration, data and model structure,
  or an error on every rank naming the one that differs. Ranks whose initial weights
  differ all start from rank 0's, as ``DistributedDataParallel`` does.
- In every pass, rank ``r`` computes its contiguous block of the shards, and the ranks
  exchange their per-shard moments (one all-gather per pass, :class:`RankExecutor`).
  Every rank then merges all shards in shard order (``passes.py``), so every rank ends
  with the same weights, byte for byte, as one process on the same hardware.
- Only rank 0 holds the run store: it locks, writes, resumes and shows progress. The
  other ranks start from a copy of what rank 0's store held (:func:`pack`), kept in a
  temporary folder removed at the end, and show nothing.
- A rank whose shards fail (bad data, Ctrl-C) says so in that pass's exchange, and every
  rank stops with the error. A rank that dies outside a pass is torchrun's to handle: it
  stops the others.

Every rank must pass the same data: the tool splits the shards itself (a loader's
``DistributedSampler`` is read in full, see ``inplace.fixed_order``).
"""

from __future__ import annotations

import contextlib
import io
import os
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from . import errors
from .errors import ConfigError, ExecutorError, Interrupted, LsuvError
from .executors import Executor, InlineExecutor
from .numerics import Admission, fingerprint

__all__ = [
    "RankExecutor",
    "Ranks",
    "agree",
    "current",
    "launched",
    "pack",
    "raise_from",
    "unpack",
]


#: The identity key of the model's initial weights (``schema.identity``).
INITIAL = "model initial state"


@dataclass(frozen=True)
class Ranks:
    """This process's place in the process group a run spans."""

    rank: int
    world: int

    @property
    def main(self) -> bool:
        """Rank 0: the one that holds the store and shows progress."""
        return self.rank == 0

    def gather(self, value) -> list:
        """Every rank's ``value``, in rank order, on every rank."""
        out = [None] * self.world
        dist.all_gather_object(out, value)
        return out

    def broadcast(self, value=None):
        """Rank 0's ``value`` on every rank."""
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]


def current(distributed: bool | None = None) -> Ranks | None:
    """The process group this run spans, or ``None`` for a run of this process alone.

    Args:
        distributed: ``None``: the initialized default group when it has more than one
            rank; ``False``: this process alone (a run on one rank of a job); ``True``:
            the group, which must be initialized.

    Raises:
        ConfigError: ``True`` and no process group is initialized.
    """
    if distributed is False:
        return None
    ready = dist.is_available() and dist.is_initialized()
    if not ready:
        if distributed:
            raise ConfigError(
                "distributed=True, but no torch.distributed process group is initialized "
                "(call torch.distributed.init_process_group first, e.g. under torchrun)"
            )
        return None
    if dist.get_world_size() == 1:
        return None
    return Ranks(dist.get_rank(), dist.get_world_size())


@contextlib.contextmanager
def launched(device: str | None = None) -> Iterator[Ranks | None]:
    """The process group of a ``torchrun`` launch, initialized while the block runs.

    ``torchrun`` gives every process ``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK`` and the
    rendezvous address. With more than one rank and no group yet, this joins them (NCCL on
    CUDA, each rank on its ``LOCAL_RANK``'s GPU; gloo on the CPU) and leaves the group on
    exit. Anything else (no launcher, one rank, a group the caller made) is left alone.
    """
    world = int(os.environ.get("WORLD_SIZE") or 1)
    if world < 2 or not dist.is_available() or dist.is_initialized():
        yield current()
        return
    cuda = str(device) != "cpu" and torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK") or 0))
    dist.init_process_group("nccl" if cuda else "gloo")
    try:
        yield current()
    finally:
        dist.destroy_process_group()


def agree(ranks: Ranks, identity: dict, differences) -> tuple[dict, list[int]]:
    """Check that every rank runs the same thing.

    ``identity`` is this rank's run identity (``schema.identity``): config, data and
    model; ``differences`` compares two (``schema.differences``). The model's initial
    weights may differ: the caller then gives every rank rank 0's, as DDP does.

    Returns:
        ``(rank 0's identity, the ranks whose initial weights differ from rank 0's)``.

    Raises:
        ConfigError: A rank's configuration, data or model structure differs from rank 0's.
    """
    every = ranks.gather(identity)
    first, weights = every[0], []
    for r, other in enumerate(every[1:], start=1):
        if other.get(INITIAL) != first.get(INITIAL):
            weights.append(r)
            other = {**other, INITIAL: first.get(INITIAL)}
        differ = differences(first, other)
        if differ:
            raise ConfigError(
                f"rank {r} of {ranks.world} runs another configuration, data or model than "
                f"rank 0 ({'; '.join(differ)}): every rank must pass the same data and model "
                "(the ranks split the shards among themselves)"
            )
    return first, weights


def pack(path: Path | None, skip: tuple[str, ...] = ()) -> bytes | None:
    """The folder ``path`` as tar bytes (``None`` for no folder), without ``skip``."""
    if path is None or not path.exists():
        return None
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for item in sorted(path.rglob("*")):
            rel = item.relative_to(path)
            if rel.parts[0] in skip:
                continue
            tar.add(item, arcname=str(rel), recursive=False)
    return buf.getvalue()


def unpack(data: bytes, path: Path) -> None:
    """Write the folder :func:`pack` made at ``path``."""
    path.mkdir(parents=True, exist_ok=True)
    with tarfile.open(fileobj=io.BytesIO(data), mode="r") as tar:
        tar.extractall(path, filter="data")


def raise_from(rank: int, failure: tuple[str, str]) -> None:
    """Raise, on this rank, the error another rank reported as ``(class name, message)``."""
    kind, message = failure
    cls = getattr(errors, kind, None)
    if not (isinstance(cls, type) and issubclass(cls, LsuvError)) or cls is errors.OffTarget:
        cls = ExecutorError
    if cls is Interrupted:
        raise Interrupted(message)
    raise cls(f"rank {rank}: {message}")


class RankExecutor(Executor):
    """Runs each pass on every rank of the group: a contiguous block of shards each, the
    per-shard moments all-gathered, every shard yielded on every rank.

    Args:
        ranks: The group.
        shard_size: The run's shard size (the blocks are cut from the pass's shard list).
        allow_mixed: Accept ranks whose numerics fingerprints differ (recorded).
    """

    def __init__(self, ranks: Ranks, shard_size: int, *, allow_mixed: bool = False) -> None:
        self.ranks = ranks
        self.shard_size = shard_size
        self.allow_mixed = allow_mixed
        self.description = f"torch.distributed ({ranks.world} ranks)"
        self._inner = InlineExecutor()
        self._admission: Admission | None = None  # rank 0's fingerprint, once gathered

    def owner(self, index: int, count: int) -> int:
        """The rank that computes shard ``index`` of ``count``: contiguous blocks."""
        return index * self.ranks.world // count

    def numerics(self, device: torch.device) -> dict:
        """Rank 0's fingerprint; a rank whose fingerprint differs is refused or recorded."""
        if self._admission is None:
            every = self.ranks.gather(fingerprint(device))
            admission = Admission(every[0], allow_mixed=self.allow_mixed, unit="rank")
            for r, fp in enumerate(every[1:], start=1):
                admission.admit(fp, f"rank {r}", "rank 0")
            self._admission = admission
        return self._admission.reference

    @property
    def mixed(self) -> list[dict]:
        return self._admission.mixed if self._admission is not None else []

    def compile(self, dtype: torch.dtype) -> float:
        """Build the kernel on every rank; a rank that cannot stops every rank, naming it
        (else the others would wait on it in the first pass)."""
        try:
            mine = ("built", self._inner.compile(dtype))
        except ConfigError as exc:
            mine = ("error", str(exc))
        every = self.ranks.gather(mine)
        for r, (outcome, value) in enumerate(every):
            if outcome == "error":
                raise ConfigError(f"rank {r}: {value}")
        return max(value for _, value in every)

    def run_pass(self, model, source, shards, plan, *, device, on_batch=None):
        count = len(source.shards(self.shard_size))
        mine = [s for s in shards if self.owner(s.index, count) == self.ranks.rank]
        done, failure, own = [], None, None
        try:
            for shard, moments in self._inner.run_pass(
                model, source, mine, plan, device=device, on_batch=on_batch
            ):
                done.append((shard.index, moments))
        except Exception as exc:  # told to every rank in the exchange, then raised
            failure, own = (type(exc).__name__, errors.first_line(exc, 2000)), exc
        every = self.ranks.gather((done, failure))
        if own is not None:
            raise own
        for r, (_, fail) in enumerate(every):
            if fail is not None:
                raise_from(r, fail)
        found = {index: m for part, _ in every for index, m in part}
        theirs = sum(len(s) for s in shards if s not in mine)
        if on_batch is not None and theirs:
            # Ctrl-C here: this rank stops in the next pass's exchange, with the others
            with contextlib.suppress(Interrupted):
                on_batch(theirs)
        for shard in shards:
            yield shard, found[shard.index]
