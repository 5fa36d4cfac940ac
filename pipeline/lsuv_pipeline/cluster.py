"""The dask client side: running a pass's shards as tasks on a dask.distributed cluster.

:class:`DaskExecutor` runs one task per (layer, shard): on a local cluster it starts
(``workers=N``, loopback only) or on an existing one (``scheduler=`` / ``scheduler_file=``).
Each pass's weights go to the cluster once, as one task's result that workers fetch from
each other (not with every task); workers open the dataset themselves from the data root
and keep what they decoded for the run (``worker.py``); tasks return per-channel moments
only, and this side never merges: ``passes.py`` merges in shard order.

A lost scheduler is one :class:`~.errors.ExecutorError` wherever it is lost; a worker of
other numerics is refused or recorded (see :class:`DaskExecutor`).
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import os
import pickle
import socket
import time
import uuid
import warnings
from collections.abc import Iterator
from concurrent.futures import CancelledError

import dask
import torch
from distributed import Client, LocalCluster, Nanny, Scheduler, SpecCluster, wait
from distributed.comm import parse_host_port
from distributed.comm.addressing import parse_address
from distributed.comm.core import CommClosedError
from distributed.scheduler import KilledWorker
from torch import nn

from .allocator import worker_env
from .data import DatasetSpec, Source
from .errors import ConfigError, ExecutorError, LsuvError, ModelError, first_line
from .executors import Executor
from .numerics import Admission, numerics_key
from .worker import Boxed, ShardTask, hold, run_shard, worker_compile, worker_fingerprint

__all__ = ["HEALTH_CHECK_S", "DaskExecutor", "connect", "quiet_dask_logs"]


#: Seconds between checks that the scheduler is still there while a pass waits on it.
HEALTH_CHECK_S = 2.0

#: Whose numerics a dask worker's are checked against, in a refusal.
CLUSTER = "the rest of the cluster"


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
        self._admission: Admission | None = None  # the cluster's fingerprint, once known
        self.description = f"dask ({len(client.scheduler_info()['workers'])} workers)"
        self._model_key = None
        self._model_future = None
        self._source_futures: dict[int, object] = {}
        self._state = None
        self._state_future = None
        self._owner: dict[int, str] = {}  # shard -> worker holding its cached cut
        self._run = uuid.uuid4().hex  # what workers key their state on

    @property
    def dashboard(self) -> str | None:
        try:
            return self.client.dashboard_link
        except Exception:
            return None

    def numerics(self, device: torch.device) -> dict:
        """The workers' common fingerprint; workers that differ are refused or recorded."""
        if self._admission is None:
            try:
                found = self.client.run(worker_fingerprint, device.type)
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
            admission = Admission(prints[main], allow_mixed=self.allow_mixed, unit="worker")
            for key, addresses in groups.items():
                admission.admit(prints[key], f"dask worker {addresses[0]}", CLUSTER)
            self._admission = admission
        return self._admission.reference

    @property
    def mixed(self) -> list[dict]:
        return self._admission.mixed if self._admission is not None else []

    def compile(self, dtype: torch.dtype) -> float:
        """Build the kernel on every worker, as a task of each (not on its event loop);
        a worker that cannot is named. A worker that joins later builds it on its first
        shard."""
        futures = [
            self.client.submit(worker_compile, dtype, workers=[address],
                               allow_other_workers=False, pure=False,
                               key=f"lsuv-compile-{uuid.uuid4().hex}")
            for address in sorted(self.client.scheduler_info()["workers"])
        ]  # fmt: skip
        try:
            return max((f.result() for f in futures), default=0.0)
        except LsuvError:
            raise
        except Exception as exc:
            raise ExecutorError(_lost(self.client, exc)) from None
        finally:
            for f in futures:
                f.release()

    def _send(self, value, name: str):
        """Put ``value`` on the cluster once, as a task that returns it.

        Unlike ``scatter(broadcast=True)``, which waits forever on a worker that just died,
        a task result is fetched by the workers that need it and recomputed from the graph
        if the worker holding it is lost.
        """
        with warnings.catch_warnings():  # "large graph": intended, it is sent once
            warnings.simplefilter("ignore", UserWarning)
            return self.client.submit(hold, value, key=f"lsuv-{name}-{uuid.uuid4().hex}")

    def _model(self, model: nn.Module):
        """The model's structure, sent once per run."""
        if self._model_key != id(model):
            boxed = Boxed(_cpu_copy(model))
            try:
                pickle.dumps(boxed)
            except Exception as exc:
                raise ModelError(
                    f"{type(model).__name__} cannot be sent to the dask workers ("
                    f"{first_line(exc, 160)}); run "
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
        self.numerics(device)
        model_future = self._model(model)
        state_future = self._weights(model)
        state_key = state_future.key
        origin = self._origin(source)
        # a user's own source travels as a future: dask resolves it as a task argument only
        shipped = [] if isinstance(origin, DatasetSpec) else [origin]
        for shard in shards:
            owner = self._owner.get(shard.index) if plan.cache is not None else None
            task = ShardTask(
                self._run, model_future.key, state_key, None if shipped else origin, shard, plan,
                device.type,
            )  # fmt: skip
            future = self.client.submit(
                run_shard,
                model_future,
                state_future,
                task,
                *shipped,
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
                self.numerics(device)  # the cluster's, known before a worker is checked
                self._admission.admit(numerics, f"dask worker {where}", CLUSTER)
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
    return (CancelledError, CommClosedError, KilledWorker, OSError, TimeoutError)


def _lost(client, exc: BaseException) -> str:
    """One line for a cluster failure: a lost scheduler, or what else failed."""
    reason = first_line(exc)
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
    """Start ``workers`` worker processes on this machine, bound to loopback, with this
    package's malloc thresholds (``allocator.py``) in place of the 64 KiB trim threshold
    dask's nannies give a worker before it starts, which faults every batch in again.

    A nanny sets its pre-spawn environment in this process's ``os.environ`` to pass it on
    (ours, and dask's own ``OMP_NUM_THREADS=1``); it is put back once the workers have
    started (a nanny restarting its worker later still passes its own on)."""
    environ = {**dask.config.get("distributed.nanny.pre-spawn-environ", {}), **worker_env()}
    saved = dict(os.environ)  # a nanny writes its pre-spawn environment into this process's
    try:
        with dask.config.set({"distributed.nanny.pre-spawn-environ": environ}):
            return _start_local(workers, device_type)
    finally:  # the workers have started: the caller's environment as it was
        for key in set(os.environ) - set(saved):
            del os.environ[key]
        os.environ.update(saved)


def _start_local(workers: int, device_type: str):
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
def quiet_dask_logs() -> Iterator[None]:
    """Silence dask's own loggers: a lost scheduler or worker is reported once, as an
    ExecutorError, not as log lines and tracebacks from dask's threads."""
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
    if not os.path.isfile(path):
        raise ExecutorError(f"scheduler file {path!r} does not exist")
    try:
        with open(path) as f:
            info = json.load(f)
    except (OSError, ValueError) as exc:
        reason = first_line(exc)
        raise ExecutorError(f"scheduler file {path!r} cannot be read as JSON ({reason})") from None
    address = info.get("address") if isinstance(info, dict) else None
    if not isinstance(address, str) or "://" not in address:
        raise ExecutorError(
            f"scheduler file {path!r} is not a dask scheduler file (no 'address'); it is "
            "written by 'dask scheduler --scheduler-file FILE'"
        )
    return address


def connect(
    workers, scheduler, scheduler_file, device_type, timeout, allow_mixed=False
) -> DaskExecutor:
    """Start a local cluster of ``workers`` processes, or connect to a running scheduler.

    Raises:
        ConfigError: A worker count below 1, or more GPU workers than GPUs.
        ExecutorError: The scheduler cannot be reached or has no workers.
    """

    if workers is not None:
        if workers < 1:
            raise ConfigError(f"--workers must be at least 1, got {workers}")
        try:
            cluster = _local_cluster(workers, device_type)
        except (RuntimeError, OSError, TimeoutError) as exc:  # e.g. "Nanny failed to start."
            raise ExecutorError(
                f"could not start a local dask cluster of {workers} worker(s): "
                f"{first_line(exc)} (each worker is a new process that imports the calling "
                "script; without --workers the run is inline)"
            ) from None
        return DaskExecutor(Client(cluster), cluster, allow_mixed=allow_mixed)
    where = scheduler or scheduler_file
    if scheduler_file is not None:
        scheduler = _scheduler_address(scheduler_file)
    try:
        client = Client(scheduler, timeout=timeout)
    except (OSError, TimeoutError, ValueError, TypeError, AssertionError) as exc:
        reason = first_line(exc)
        raise ExecutorError(f"cannot reach the dask scheduler at {where!r}: {reason}") from None
    executor = DaskExecutor(client, allow_mixed=allow_mixed)
    try:
        client.wait_for_workers(1, timeout=timeout)
    except TimeoutError:
        executor.close()
        raise ExecutorError(
            f"the dask scheduler at {where!r} has no workers (waited {timeout:g} s)"
        ) from None
    executor.description = f"dask ({len(client.scheduler_info()['workers'])} workers)"
    return executor
