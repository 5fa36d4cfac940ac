"""Running one pass over the shards of a split: the per-shard work and who does it.

A pass measures some layers' output moments over every shard of a split, optionally ending
each forward right after the layer being solved. :func:`measure_shard` is the whole work of
one shard; an executor decides where shards run and hands back ``(shard, moments)`` pairs
as they finish. Executors never merge: the coordinator merges in shard order, so the result
does not depend on which executor ran the pass or in what order shards finished.

- :class:`InlineExecutor` (the default) runs shards one after another in this process.
- :class:`DaskExecutor` runs one task per (layer, shard) on a dask.distributed cluster: a
  local one it starts (``workers=N``) or an existing one (``scheduler=`` /
  ``scheduler_file=``). Each pass's weights go to the cluster once, as one task's
  result that workers fetch from each other (not with every task); workers
  open the dataset themselves from the data root and keep decoded shards in a worker-local
  cache across the passes of a run; tasks return per-channel moments only.
"""

from __future__ import annotations

import contextlib
import copy
import os
import threading
import time
import uuid
import warnings
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from . import moments as mom
from .cache import ActivationCache, Segments, default_budget
from .data import DatasetSpec, Shard, Source, open_source
from .errors import ConfigError, ExecutorError, LsuvError, ModelError
from .layers import LayerInfo, capture, evaluating, solved_outputs
from .numerics import fingerprint, numerics_differences, numerics_key, reproducible
from .solve import Solution

__all__ = [
    "CachePlan",
    "DaskExecutor",
    "Executor",
    "ExecutorError",
    "InlineExecutor",
    "PassPlan",
    "ShardMoments",
    "measure_shard",
    "open_executor",
]

#: Layer name -> per-call moments of one shard.
ShardMoments = dict[str, tuple[mom.Moments, ...]]


@dataclass(frozen=True)
class CachePlan:
    """Run a layer's pass from cached activations (see ``cache.py``).

    Attributes:
        token: Identifies the run; cuts of another run are never used.
        layers: The run's target layers, in forward order (where the graph is cut).
        index: The layer this pass measures.
        budget: Most bytes of cached activations per process (``None``: half the memory
            free on the device when the cache is first used).
    """

    token: str
    layers: tuple[LayerInfo, ...]
    index: int
    budget: int | None = None


@dataclass(frozen=True)
class PassPlan:
    """What one pass measures.

    Attributes:
        layers: Layers whose output moments are accumulated.
        stop_after: End each forward after this layer (early exit), or run it whole.
        batch_size: Samples per forward.
        allow_tf32: Let CUDA use TF32 (faster, not reproducible across GPUs).
        solved: ``(layer name, update)`` of the layers solved so far: their outputs are
            mapped through their updates (the model keeps its initial weights).
        cache: Measure from cached activations (one layer, early exit implied).
    """

    layers: tuple[LayerInfo, ...]
    stop_after: LayerInfo | None
    batch_size: int
    allow_tf32: bool = False
    solved: tuple[tuple[str, Solution], ...] = ()
    cache: CachePlan | None = None


def measure_shard(
    model: nn.Module,
    batches: Iterator[torch.Tensor],
    plan: PassPlan,
    *,
    device: torch.device,
    on_batch: Callable[[int], None] | None = None,
) -> ShardMoments:
    """Run ``model`` over one shard's batches; return each planned layer's moments per call.

    The model runs in eval mode under ``inference_mode``; its own modes are restored after.
    Moments stay on ``device`` until the shard ends (no host sync per batch).

    Returns:
        Layer name -> one :class:`~.moments.Moments` per call in a forward (on the CPU).
    """
    with (
        evaluating(model),
        torch.inference_mode(),
        reproducible(device, allow_tf32=plan.allow_tf32),
        solved_outputs(model, plan.solved),
        capture(model, plan.layers, stop_after=plan.stop_after) as cap,
    ):
        for x in batches:
            cap.forward(x.to(device, non_blocking=True))
            if on_batch is not None:
                on_batch(x.shape[0])
    return {name: tuple(m.to("cpu") for m in calls) for name, calls in cap.moments.items()}


class _CachedRunner:
    """Segments and activation cache of one process (the coordinator, or a worker thread)."""

    def __init__(self) -> None:
        self.segments: Segments | None = None
        self.segments_key: tuple | None = None
        self.cache: ActivationCache | None = None
        self.per_sample = 0  # bytes of a cached cut per sample, last seen

    def measure(self, model, source_batches, shard, plan, device, on_batch) -> ShardMoments:
        spec = plan.cache
        key = (id(model), tuple(i.name for i in spec.layers))
        if self.segments_key != key:
            self.segments = Segments(model, spec.layers)
            self.segments_key = key
        if self.cache is None:
            budget = spec.budget if spec.budget is not None else default_budget(device)
            self.cache = ActivationCache(budget)
        state = self.cache.take(spec.token, shard.index)
        keep = state is not None or self.cache.room(self.per_sample * len(shard))
        index = {name: k for k, name in enumerate(self.segments.names)}
        solved = {index[name]: sol for name, sol in plan.solved if name in index}
        with (
            evaluating(model),
            torch.inference_mode(),
            reproducible(device, allow_tf32=plan.allow_tf32),
        ):
            moments, new = self.segments.measure(
                source_batches(),
                spec.index,
                solved,
                device,
                state,
                keep,
                on_batch,
            )
        if new is not None:
            self.per_sample = max(self.per_sample, new.nbytes // max(1, len(shard)))
            self.cache.put(spec.token, shard.index, new)
        return {spec.layers[spec.index].name: moments}


class Executor:
    """Runs passes. Subclasses decide where shards run."""

    description = "inline"

    def run_pass(
        self,
        model: nn.Module,
        source: Source,
        shards: Sequence[Shard],
        plan: PassPlan,
        *,
        device: torch.device,
        on_batch: Callable[[int], None] | None = None,
    ) -> Iterator[tuple[Shard, ShardMoments]]:
        """Yield ``(shard, moments)`` for every shard, in completion order.

        ``on_batch(n)`` is called as samples finish (per batch inline, per shard on a
        cluster); it may raise to stop the pass.
        """
        raise NotImplementedError

    def numerics(self, device: torch.device) -> dict:
        """The numerics fingerprint of where the passes run (see ``numerics.py``)."""
        return fingerprint(device)

    @property
    def mixed(self) -> list[dict]:
        """Fingerprints other than :meth:`numerics`'s that computed shards (allowed mixing)."""
        return []

    def close(self) -> None:
        """Release whatever the executor started."""

    def __enter__(self) -> Executor:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class InlineExecutor(Executor):
    """Runs every shard in this process, in shard order, on one device."""

    def __init__(self) -> None:
        self._cached = _CachedRunner()

    def run_pass(self, model, source, shards, plan, *, device, on_batch=None):
        for shard in shards:
            if plan.cache is not None:
                moments = self._cached.measure(
                    model,
                    lambda shard=shard: source.batches(shard, plan.batch_size),
                    shard,
                    plan,
                    device,
                    on_batch,
                )
            else:
                batches = source.batches(shard, plan.batch_size)
                moments = measure_shard(model, batches, plan, device=device, on_batch=on_batch)
            yield shard, moments


# -- dask.distributed ----------------------------------------------------------------

#: Decoded shards a worker keeps across the passes of a run, by default at most this many
#: bytes (``$LSUV_WORKER_CACHE_MB`` overrides).
WORKER_CACHE_BYTES = 2 << 30

_worker_lock = threading.Lock()
_worker_sources: dict[tuple, Source] = {}
_worker_shards: OrderedDict[tuple, list[torch.Tensor]] = OrderedDict()
_worker_cached_bytes = 0


def _cache_budget() -> int:
    mb = os.environ.get("LSUV_WORKER_CACHE_MB")
    return int(mb) << 20 if mb else WORKER_CACHE_BYTES


def _worker_source(origin: DatasetSpec | Source) -> tuple[tuple, Source]:
    """Open (once per worker) the source a task reads; return it with its cache key."""
    if isinstance(origin, Source):
        return ("object", origin.fingerprint), origin
    key = ("spec", tuple(sorted(origin.to_dict().items())))
    with _worker_lock:
        if key not in _worker_sources:
            _worker_sources[key] = open_source(origin)
        return key, _worker_sources[key]


def _worker_batches(origin, shard: Shard, batch_size: int) -> list[torch.Tensor]:
    """The shard's batches, decoded once per worker and kept while the budget allows."""
    global _worker_cached_bytes
    source_key, source = _worker_source(origin)
    key = (source_key, shard.start, shard.stop, batch_size)
    with _worker_lock:
        if key in _worker_shards:
            _worker_shards.move_to_end(key)
            return _worker_shards[key]
    batches = list(source.batches(shard, batch_size))
    size = sum(b.numel() * b.element_size() for b in batches)
    budget = _cache_budget()
    with _worker_lock:
        while _worker_shards and _worker_cached_bytes + size > budget:
            _, old = _worker_shards.popitem(last=False)
            _worker_cached_bytes -= sum(b.numel() * b.element_size() for b in old)
        if size <= budget:
            _worker_shards[key] = batches
            _worker_cached_bytes += size
    return batches


def _worker_device(device_type: str) -> torch.device:
    if device_type == "cuda":
        if not torch.cuda.is_available():
            raise ExecutorError("a dask worker has no CUDA device, but the run asks for cuda")
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _hold(value):
    """A task that returns its argument: how one value is put on the cluster once."""
    return value


class _Boxed:
    """Carries a module through dask as one plain pickle (dask's own torch serializer
    rebuilds modules without their hook dicts, which forward hooks need)."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model


_worker_models: dict[int, tuple[str, nn.Module, str]] = {}


def _worker_model(boxed: _Boxed, model_key: str, state, state_key: str, device) -> nn.Module:
    """This thread's own copy of the run's model, holding this pass's weights.

    The shipped model is never run or changed: a worker may still have to send it to a
    peer, and a module that ran carries hooks. Each thread gets a private deep copy (one
    per worker thread, the latest run's only), loaded once per pass.
    """
    thread = threading.get_ident()
    with _worker_lock:
        entry = _worker_models.get(thread)
    if entry is None or entry[0] != model_key:
        entry = (model_key, copy.deepcopy(boxed.model), "")
    key, model, loaded = entry
    if loaded != state_key:
        model.load_state_dict(state)
        model.to(device)
    with _worker_lock:
        _worker_models[thread] = (key, model, state_key)
    return model


_worker_runners: dict[int, _CachedRunner] = {}
_worker_cache: ActivationCache | None = None


def _worker_fingerprint(device_type: str) -> dict:
    """This worker's numerics fingerprint, for the device type of the run."""
    return fingerprint(_worker_device(device_type))


def _shard_task(
    boxed: _Boxed,
    model_key: str,
    state: dict[str, torch.Tensor],
    state_key: str,
    origin: DatasetSpec | Source,
    shard: Shard,
    plan: PassPlan,
    device_type: str,
) -> tuple[ShardMoments, str, dict]:
    """One (pass, shard) task on a worker: load this pass's weights once, measure the shard.

    Returns the moments, this worker's address (for a cached pass it now holds the shard's
    cut, so the shard's next pass should run here) and its numerics fingerprint.
    """
    global _worker_cache
    from distributed import get_worker

    device = _worker_device(device_type)
    numerics = fingerprint(device)
    model = _worker_model(boxed, model_key, state, state_key, device)
    if plan.cache is None:
        batches = _worker_batches(origin, shard, plan.batch_size)
        moments = measure_shard(model, iter(batches), plan, device=device)
        return moments, get_worker().address, numerics
    with _worker_lock:
        runner = _worker_runners.setdefault(threading.get_ident(), _CachedRunner())
        if _worker_cache is None:  # one budget for the worker, shared by its threads
            budget = plan.cache.budget
            _worker_cache = ActivationCache(
                budget if budget is not None else default_budget(device)
            )
        runner.cache = _worker_cache
    moments = runner.measure(
        model,
        lambda: _worker_source(origin)[1].batches(shard, plan.batch_size),
        shard,
        plan,
        device,
        None,
    )
    return moments, get_worker().address, numerics


#: Seconds between checks that the scheduler is still there while a pass waits on it.
HEALTH_CHECK_S = 2.0


class DaskExecutor(Executor):
    """Runs each pass as one task per shard on a dask.distributed cluster.

    Every task reports its worker's numerics fingerprint. Workers of different hardware or
    library builds would make the result depend on which worker ran which shard, so the
    first shard from a worker whose fingerprint differs from the cluster's is an
    :class:`ExecutorError`, unless ``allow_mixed``: then the run goes on and :attr:`mixed`
    lists the other fingerprints, for the store to record.

    Args:
        client: A connected ``distributed.Client``.
        cluster: A cluster this executor started and must shut down (else ``None``).
        allow_mixed: Accept workers whose numerics differ.
    """

    def __init__(self, client, cluster=None, *, allow_mixed: bool = False) -> None:
        self.client = client
        self.cluster = cluster
        self.allow_mixed = allow_mixed
        self._numerics: dict | None = None  # the cluster's fingerprint, once known
        self._mixed: dict[str, dict] = {}  # numerics key -> fingerprint, other than the above
        self.description = f"dask ({len(client.scheduler_info()['workers'])} workers)"
        self._model_key = None
        self._model_future = None
        self._source_futures: dict[int, object] = {}
        self._state = None
        self._state_future = None
        self._owner: dict[int, str] = {}  # shard -> worker holding its cached cut

    @property
    def dashboard(self) -> str | None:
        try:
            return self.client.dashboard_link
        except Exception:
            return None

    def numerics(self, device: torch.device) -> dict:
        """The workers' common fingerprint; workers that differ are refused or recorded."""
        if self._numerics is None:
            try:
                found = self.client.run(_worker_fingerprint, device.type)
            except LsuvError:
                raise
            except Exception as exc:
                raise ExecutorError(_lost(self.client, exc)) from None
            groups: dict[str, list[str]] = {}
            prints = {}
            for address, fp in sorted(found.items()):
                key = numerics_key(fp)
                groups.setdefault(key, []).append(address)
                prints[key] = fp
            # the fingerprint most workers share is the cluster's (ties: the first address)
            main = min(groups, key=lambda k: (-len(groups[k]), groups[k][0]))
            self._numerics = prints[main]
            for key, addresses in groups.items():
                if key != main:
                    self._admit(prints[key], addresses[0])
        return self._numerics

    @property
    def mixed(self) -> list[dict]:
        return list(self._mixed.values())

    def _admit(self, fp: dict, where: str) -> None:
        """Check a worker's fingerprint against the cluster's; refuse or record another."""
        key = numerics_key(fp)
        if key == numerics_key(self._numerics) or key in self._mixed:
            return
        if not self.allow_mixed:
            raise ExecutorError(
                f"dask worker {where} computes with other numerics than the rest of the "
                f"cluster ({'; '.join(numerics_differences(self._numerics, fp))}), so the "
                "result would depend on which worker ran which shard; use workers of one "
                "hardware type and library build, or pass --allow-mixed-hardware (recorded "
                "in the store)"
            )
        self._mixed[key] = fp

    def _send(self, value, name: str):
        """Put ``value`` on the cluster once, as a task that returns it.

        Unlike ``scatter(broadcast=True)``, which waits forever on a worker that just died,
        a task result is fetched by the workers that need it and recomputed from the graph
        if the worker holding it is lost.
        """
        with warnings.catch_warnings():  # "large graph": intended, it is sent once
            warnings.simplefilter("ignore", UserWarning)
            return self.client.submit(_hold, value, key=f"lsuv-{name}-{uuid.uuid4().hex}")

    def _model(self, model: nn.Module):
        """The model's structure, sent once per run."""
        if self._model_key != id(model):
            import pickle

            boxed = _Boxed(_cpu_copy(model))
            try:
                pickle.dumps(boxed)
            except Exception as exc:
                raise ModelError(
                    f"{type(model).__name__} cannot be sent to the dask workers ("
                    f"{(str(exc).strip().splitlines() or [type(exc).__name__])[0][:160]}); run "
                    "it inline (without --workers / --scheduler)"
                ) from None
            self._model_future = self._send(boxed, "model")
            self._model_key = id(model)
        return self._model_future

    def _weights(self, model: nn.Module):
        """The model's current weights on the cluster, sent again only when they change.

        During the solve they stay the initial weights (solved layers are applied to their
        outputs), so they are sent once for the solve and once per verification state.
        """
        state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
        same = self._state is not None and all(
            torch.equal(state[k], v) for k, v in self._state.items()
        )
        if not same:
            if self._state_future is not None:
                self._state_future.release()
            self._state = {k: v.clone() for k, v in state.items()}
            self._state_future = self._send(state, "weights")
        return self._state_future

    def _origin(self, source: Source):
        if source.spec is not None:
            return _worker_spec(source.spec)  # workers open it from the data root
        if id(source) not in self._source_futures:  # a user's own source: ship it once
            self._source_futures[id(source)] = self._send(source, "source")
        return self._source_futures[id(source)]

    def run_pass(self, model, source, shards, plan, *, device, on_batch=None):
        if not shards:
            return
        futures: dict = {}
        try:
            yield from self._run_pass(model, source, shards, plan, device, on_batch, futures)
        except LsuvError:
            raise
        except Exception as exc:
            # the scheduler or the connection to it went away somewhere in the pass: in a
            # submit, while waiting, or in a result; however slow, it ends the same way
            if not isinstance(exc, _cluster_failures()) and self.client.status == "running":
                raise
            raise ExecutorError(_lost(self.client, exc)) from None
        finally:
            for future in futures:  # stopped early: drop what is still queued
                with contextlib.suppress(Exception):
                    future.cancel()

    def _run_pass(self, model, source, shards, plan, device, on_batch, futures):
        from distributed import wait

        self.numerics(device)
        model_future = self._model(model)
        state_future = self._weights(model)
        state_key = state_future.key
        origin = self._origin(source)
        for shard in shards:
            owner = self._owner.get(shard.index) if plan.cache is not None else None
            future = self.client.submit(
                _shard_task,
                model_future,
                model_future.key,
                state_future,
                state_key,
                origin,
                shard,
                plan,
                device.type,
                key=f"lsuv-shard-{shard.index}-{uuid.uuid4().hex}",
                pure=False,
                # the worker holding the shard's cut, if any; a lost worker's shards
                # run elsewhere and are recomputed from the input
                **({"workers": [owner], "allow_other_workers": True} if owner else {}),
            )
            futures[future] = shard
        pending = set(futures)
        while pending:
            try:
                done, _ = wait(list(pending), timeout=HEALTH_CHECK_S, return_when="FIRST_COMPLETED")
            except TimeoutError:
                self._check_scheduler()
                continue
            for future in sorted(done, key=lambda f: futures[f].index):
                pending.discard(future)
                shard = futures.pop(future)
                moments, where, numerics = future.result()
                self._admit(numerics, where)
                if plan.cache is not None:
                    self._owner[shard.index] = where
                future.release()
                if on_batch is not None:
                    on_batch(len(shard))
                yield shard, moments

    def _check_scheduler(self) -> None:
        """Fail at once when the scheduler is gone, instead of waiting out the client's
        reconnection (its whole --scheduler-timeout): the client lost its connection and
        the scheduler's port refuses a new one."""
        if self.client.status != "running" and not _reachable(self.client.scheduler.address):
            raise ExecutorError(_lost(self.client, ConnectionError("scheduler-connection-lost")))

    def close(self) -> None:
        if self.cluster is not None:
            with contextlib.suppress(Exception):
                self.client.close()
            with contextlib.suppress(Exception):
                self.cluster.close()
        else:
            with contextlib.suppress(Exception):
                self.client.close()  # disconnect; the cluster stays up


def _cpu_copy(model: nn.Module) -> nn.Module:
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    if device.type == "cpu":
        return model
    return copy.deepcopy(model).to("cpu")


def _worker_spec(spec: DatasetSpec) -> DatasetSpec:
    """Workers never download: the coordinator already made sure the files are there."""
    return DatasetSpec(**{**spec.to_dict(), "download": False})


def _cluster_failures() -> tuple[type[BaseException], ...]:
    """Exceptions that mean the cluster, not the task, failed."""
    from concurrent.futures import CancelledError

    from distributed.comm.core import CommClosedError
    from distributed.scheduler import KilledWorker

    return (CancelledError, CommClosedError, KilledWorker, OSError, TimeoutError)


def _lost(client, exc: BaseException) -> str:
    """One line for a cluster failure: a lost scheduler, or what else failed."""
    reason = (str(exc).strip().splitlines() or [""])[0][:200]
    address = client.scheduler.address if client.scheduler is not None else "?"
    lost = "scheduler-connection-lost" in reason or client.status != "running"
    if not lost and isinstance(exc, _cluster_failures()):
        # the client may not have noticed yet, and a scheduler just killed may still be
        # closing its port (how soon depends on the machine's load): ask the port itself,
        # a few times, since once gone it stays gone
        for attempt in range(5):
            if attempt:
                time.sleep(1.0)
            if client.status != "running" or not _reachable(address):
                lost = True
                break
    if lost:
        what = f"lost the dask scheduler {address}"
    else:
        what = f"the dask cluster failed ({type(exc).__name__}: {reason})"
    return (
        f"{what} during the pass; the finished shards are kept in the store: start the "
        "cluster again and rerun the same command to resume"
    )


def _reachable(address: str, timeout: float = 5.0) -> bool:
    """Whether a TCP connection to a ``tcp://host:port`` address is accepted."""
    import socket

    from distributed.comm import parse_host_port
    from distributed.comm.addressing import parse_address

    try:
        scheme, location = parse_address(address)
        if scheme not in ("tcp", "tls"):
            return True  # cannot tell: trust the client's status
        host, port = parse_host_port(location)
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except (OSError, ValueError, TypeError):
        return False


def _local_cluster(workers: int, device_type: str):
    """Start ``workers`` worker processes on this machine, bound to loopback."""
    from distributed import LocalCluster, Nanny, Scheduler, SpecCluster

    if device_type == "cuda":
        count = torch.cuda.device_count()
        if workers > count:
            raise ConfigError(f"--workers {workers} with --device cuda, but only {count} GPU(s)")
        # one worker per GPU, each pinned to its device
        spec = {
            f"gpu-{i}": {
                "cls": Nanny,
                "options": {
                    "nthreads": 1,
                    "host": "127.0.0.1",
                    "env": {"CUDA_VISIBLE_DEVICES": str(i)},
                },
            }
            for i in range(workers)
        }
        scheduler = {
            "cls": Scheduler,
            "options": {"host": "127.0.0.1", "dashboard_address": "127.0.0.1:0"},
        }
        return SpecCluster(workers=spec, scheduler=scheduler, silence_logs=40)
    threads = str(max(1, (os.cpu_count() or 1) // workers))
    return LocalCluster(
        n_workers=workers,
        threads_per_worker=1,
        processes=True,
        host="127.0.0.1",
        dashboard_address="127.0.0.1:0",
        silence_logs=40,
        env={"OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads},
    )


@contextlib.contextmanager
def open_executor(
    *,
    workers: int | None = None,
    scheduler: str | None = None,
    scheduler_file: str | None = None,
    device_type: str = "cpu",
    timeout: float = 20.0,
    allow_mixed: bool = False,
) -> Iterator[Executor]:
    """Yield the executor the options ask for; shut down only what it started.

    Args:
        workers: Start a local cluster of this many worker processes.
        scheduler: Address of a running dask scheduler (``tcp://host:8786``).
        scheduler_file: A scheduler file written by ``dask scheduler --scheduler-file``.
        device_type: ``"cpu"`` or ``"cuda"``: the device each worker computes on.
        timeout: Seconds to wait for an existing scheduler.
        allow_mixed: Accept dask workers whose numerics fingerprints differ.

    Raises:
        ConfigError: More than one of the three options.
        ExecutorError: The scheduler cannot be reached.
    """
    chosen = [x for x in (workers, scheduler, scheduler_file) if x is not None]
    if len(chosen) > 1:
        raise ConfigError("use only one of --workers, --scheduler and --scheduler-file")
    if not chosen:
        yield InlineExecutor()
        return
    with quiet_dask_logs():
        executor = _connect(workers, scheduler, scheduler_file, device_type, timeout)
        executor.allow_mixed = allow_mixed
        try:
            yield executor
        finally:
            executor.close()


@contextlib.contextmanager
def quiet_dask_logs() -> Iterator[None]:
    """Silence dask's own loggers: a lost scheduler or worker is reported once, as an
    ExecutorError, not as log lines and tracebacks from dask's threads."""
    import logging

    import distributed  # noqa: F401  (configures dask's loggers)

    names = ["distributed"] + [
        n for n in logging.root.manager.loggerDict if n.startswith("distributed.")
    ]
    saved = {n: logging.getLogger(n).level for n in names}
    for n in names:
        logging.getLogger(n).setLevel(logging.CRITICAL + 1)
    try:
        yield
    finally:
        for n, level in saved.items():
            logging.getLogger(n).setLevel(level)


def _scheduler_address(path: str) -> str:
    """The address in a scheduler file (``dask scheduler --scheduler-file``).

    Raises:
        ExecutorError: The file is missing, or is not a scheduler file.
    """
    import json

    if not os.path.isfile(path):
        raise ExecutorError(f"scheduler file {path!r} does not exist")
    try:
        with open(path) as f:
            info = json.load(f)
    except (OSError, ValueError) as exc:
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise ExecutorError(f"scheduler file {path!r} cannot be read as JSON ({reason})") from None
    address = info.get("address") if isinstance(info, dict) else None
    if not isinstance(address, str) or "://" not in address:
        raise ExecutorError(
            f"scheduler file {path!r} is not a dask scheduler file (no 'address'); it is "
            "written by 'dask scheduler --scheduler-file FILE'"
        )
    return address


def _connect(workers, scheduler, scheduler_file, device_type, timeout) -> DaskExecutor:
    from distributed import Client

    if workers is not None:
        if workers < 1:
            raise ConfigError(f"--workers must be at least 1, got {workers}")
        cluster = _local_cluster(workers, device_type)
        return DaskExecutor(Client(cluster), cluster)
    where = scheduler or scheduler_file
    if scheduler_file is not None:
        scheduler = _scheduler_address(scheduler_file)
    try:
        client = Client(scheduler, timeout=timeout)
    except (OSError, TimeoutError, ValueError, TypeError, AssertionError) as exc:
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise ExecutorError(f"cannot reach the dask scheduler at {where!r}: {reason}") from None
    executor = DaskExecutor(client)
    try:
        client.wait_for_workers(1, timeout=timeout)
    except TimeoutError:
        executor.close()
        raise ExecutorError(
            f"the dask scheduler at {where!r} has no workers (waited {timeout:g} s)"
        ) from None
    executor.description = f"dask ({len(client.scheduler_info()['workers'])} workers)"
    return executor
