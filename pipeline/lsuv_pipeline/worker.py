"""The dask worker side: what a worker keeps for a run, and one (pass, shard) task.

A worker keeps, for the run its tasks belong to, the sources it opened, the decoded shards
(an image folder's as uint8 pixels, before normalization; within ``$LSUV_WORKER_CACHE_MB``,
default 2048 MiB), one private copy of the model per worker thread (loaded once per pass)
and the activation cache of cached passes. All of it is one :class:`WorkerState`, made
afresh when the first task of another run arrives, so a new run never inherits an old
run's budget, model copies or fx segments. A task still running for the old run keeps the
state it started with.

Only this module runs on the workers; ``cluster.py`` is the client side.
"""

from __future__ import annotations

import copy
import os
import threading
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from distributed import get_worker
from torch import nn

from . import compiled
from .cache import ActivationCache, default_budget
from .data import DatasetSpec, Shard, Source, open_source
from .errors import ConfigError, ExecutorError
from .models import assign_state_
from .numerics import fingerprint
from .shard import CachedRunner, PassPlan, ShardMoments, measure_shard

__all__ = [
    "WORKER_CACHE_BYTES",
    "Boxed",
    "ShardTask",
    "WorkerState",
    "hold",
    "run_shard",
    "worker_compile",
    "worker_fingerprint",
]

#: Decoded shards a worker keeps across the passes of a run, by default at most this many
#: bytes (``$LSUV_WORKER_CACHE_MB`` overrides).
WORKER_CACHE_BYTES = 2 << 30


def hold(value):
    """A task that returns its argument: how one value is put on the cluster once."""
    return value


class Boxed:
    """Carries a module through dask as one plain pickle (dask's own torch serializer
    rebuilds modules without their hook dicts, which forward hooks need)."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model


def _device(device_type: str) -> torch.device:
    if device_type == "cuda":
        if not torch.cuda.is_available():
            raise ExecutorError("a dask worker has no CUDA device, but the run asks for cuda")
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def worker_fingerprint(device_type: str) -> dict:
    """This worker's numerics fingerprint, for the device type of the run."""
    return fingerprint(_device(device_type))


def worker_compile(dtype: torch.dtype) -> float:
    """Build this worker's compiled moments kernel; a failure names the worker."""
    try:
        return compiled.prepare(dtype)
    except ConfigError as exc:
        raise ConfigError(f"dask worker {get_worker().address}: {exc}") from None


def _nbytes(batches: list[torch.Tensor]) -> int:
    return sum(b.numel() * b.element_size() for b in batches)


@dataclass
class WorkerState:
    """Everything one worker keeps for one run."""

    run: str
    budget: int = field(default_factory=lambda: _shard_budget())
    lock: threading.Lock = field(default_factory=threading.Lock)
    sources: dict[tuple, Source] = field(default_factory=dict)
    shards: OrderedDict[tuple, list[torch.Tensor]] = field(default_factory=OrderedDict)
    shard_bytes: int = 0
    models: dict[int, tuple[str, nn.Module, str]] = field(default_factory=dict)
    runners: dict[int, CachedRunner] = field(default_factory=dict)
    cache: ActivationCache | None = None

    def source(self, origin: DatasetSpec | Source) -> tuple[tuple, Source]:
        """Open (once) the source a task reads; return it with its cache key."""
        if isinstance(origin, Source):
            return ("object", origin.fingerprint), origin
        key = ("spec", origin.key())
        with self.lock:
            if key not in self.sources:
                self.sources[key] = open_source(origin)
            return key, self.sources[key]

    def inputs(self, origin, shard: Shard, batch_size: int) -> Iterator[torch.Tensor]:
        """The shard's batches, from what :meth:`batches` keeps."""
        source = self.source(origin)[1]
        return (source.from_raw(raw) for raw in self.batches(origin, shard, batch_size))

    def batches(self, origin, shard: Shard, batch_size: int) -> list[torch.Tensor]:
        """The shard's raw batches (``Source.raw_batch``: an image folder's uint8 pixels),
        decoded once and kept while the budget allows."""
        source_key, source = self.source(origin)
        key = (source_key, shard.start, shard.stop, batch_size)
        with self.lock:
            if key in self.shards:
                self.shards.move_to_end(key)
                return self.shards[key]
        batches = [source.raw_batch(a, b) for a, b in source.batch_ranges(shard, batch_size)]
        size = _nbytes(batches)
        with self.lock:
            while self.shards and self.shard_bytes + size > self.budget:
                _, old = self.shards.popitem(last=False)
                self.shard_bytes -= _nbytes(old)
            if size <= self.budget:
                self.shards[key] = batches
                self.shard_bytes += size
        return batches

    def model(self, boxed: Boxed, model_key: str, state, state_key: str, device) -> nn.Module:
        """This thread's own copy of the run's model, holding this pass's weights.

        The shipped model is never run or changed: a worker may still have to send it to
        a peer, and a module that ran carries hooks. Each thread gets a private deep copy,
        loaded once per pass.
        """
        thread = threading.get_ident()
        with self.lock:
            entry = self.models.get(thread)
        if entry is None or entry[0] != model_key:
            entry = (model_key, copy.deepcopy(boxed.model), "")
        key, model, loaded = entry
        if loaded != state_key:
            assign_state_(model, state)
            model.to(device)
        with self.lock:
            self.models[thread] = (key, model, state_key)
        return model

    def runner(self, plan: PassPlan, device: torch.device) -> CachedRunner:
        """This thread's cached-pass runner; the run's one activation cache is shared."""
        with self.lock:
            if self.cache is None:
                budget = plan.cache.budget
                self.cache = ActivationCache(
                    budget if budget is not None else default_budget(device)
                )
            return self.runners.setdefault(threading.get_ident(), CachedRunner(self.cache))


def _shard_budget() -> int:
    mb = os.environ.get("LSUV_WORKER_CACHE_MB")
    return int(mb) << 20 if mb else WORKER_CACHE_BYTES


_current = WorkerState(run="")
_current_lock = threading.Lock()


def _state(run: str) -> WorkerState:
    """The state of ``run`` on this worker; another run's is dropped."""
    global _current
    with _current_lock:
        if _current.run != run:
            _current = WorkerState(run=run)
        return _current


@dataclass(frozen=True)
class ShardTask:
    """What a (pass, shard) task needs besides the model and its weights (futures)."""

    run: str
    model_key: str
    state_key: str
    origin: DatasetSpec | None
    shard: Shard
    plan: PassPlan
    device_type: str


def run_shard(
    boxed: Boxed, state: dict[str, torch.Tensor], task: ShardTask, source: Source | None = None
):
    """One (pass, shard) task on a worker: load this pass's weights once, measure the shard.

    The shard is read from ``task.origin`` (a dataset the worker opens) or from ``source``
    (a user's own data, shipped once as a future that dask resolves into this argument).

    Returns:
        ``(moments, address, fingerprint)``: the shard's moments, this worker's address
        (for a cached pass it now holds the shard's cut, so the shard's next pass should
        run here) and its numerics fingerprint.
    """
    mine = _state(task.run)
    device = _device(task.device_type)
    numerics = fingerprint(device)
    model = mine.model(boxed, task.model_key, state, task.state_key, device)
    plan, shard = task.plan, task.shard
    origin = source if source is not None else task.origin
    if plan.cache is None:
        batches = mine.inputs(origin, shard, plan.batch_size)
        moments: ShardMoments = measure_shard(model, batches, plan, device=device)
    else:
        moments = mine.runner(plan, device).measure(
            model,
            lambda: mine.source(origin)[1].batches(shard, plan.batch_size),
            shard,
            plan,
            device,
            None,
        )
    return moments, get_worker().address, numerics
