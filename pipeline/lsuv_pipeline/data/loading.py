"""Parallel loading: decoding a batch's samples on threads, and reading ahead of the model.

Two mechanisms, both byte-neutral (a batch is the same tensor whatever they do):

* :func:`ordered_map` decodes a batch's samples on a shared thread pool and returns them in
  index order. PIL releases the GIL while it decodes and resizes, so an image folder's batch
  takes about ``1 / workers`` of the time on as many cores.
* :func:`prefetched` produces a pass's next batches on a background thread, at most
  ``depth`` ahead, while the current one computes. An error of the producer (a
  :class:`~lsuv_pipeline.errors.DataError` naming the file) is raised in the consumer as it
  was raised; closing the iterator early (an error, Ctrl-C, an early exit) stops the thread
  after the batch in hand.

``loader_workers`` (:func:`default_workers` unless given) is a setting of the process, never
of the run: it changes neither the bytes of a batch nor the run's identity.
"""

from __future__ import annotations

import contextlib
import os
import queue
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

import torch

from .. import batches as B

__all__ = ["default_workers", "ordered_map", "prefetched"]

T = TypeVar("T")
R = TypeVar("R")

#: Most loader threads by default: past about 8, decoding stops being what a pass waits on.
MAX_DEFAULT_WORKERS = 8

_pools: dict[int, ThreadPoolExecutor] = {}
_pools_lock = threading.Lock()


def default_workers() -> int:
    """The default number of loader workers: the cores this process may use, at most 8."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    return max(1, min(MAX_DEFAULT_WORKERS, cores))


def _pool(workers: int) -> ThreadPoolExecutor:
    with _pools_lock:
        if workers not in _pools:
            _pools[workers] = ThreadPoolExecutor(workers, thread_name_prefix="lsuv-decode")
        return _pools[workers]


def ordered_map(fn: Callable[[T], R], items: Sequence[T], workers: int) -> list[R]:
    """``[fn(x) for x in items]``, on ``workers`` threads when above 1; the first error in
    ``items``' order is raised as it was."""
    if workers <= 1 or len(items) <= 1:
        return [fn(x) for x in items]
    return list(_pool(workers).map(fn, items))


_DONE = object()


def prefetched(batches: Iterable[T], depth: int = 2, *, pin: bool = False) -> Iterator[T]:
    """Yield ``batches``' items in order, produced on a background thread ``depth`` ahead.

    With ``pin``, each batch's tensors are copied to pinned (page-locked) host memory on
    that thread, so a ``non_blocking`` copy to a CUDA device overlaps the compute.
    The thread starts at the first ``next`` and is joined when the iterator ends or is
    closed (``close()``, or its last reference dropped), at most one batch later.
    """
    items: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def produce() -> None:
        it = iter(batches)
        try:
            for batch in it:
                if pin:
                    batch = B.map_leaves(torch.Tensor.pin_memory, batch)
                items.put((batch, None))
                if stop.is_set():
                    return
            items.put((_DONE, None))
        except BaseException as exc:  # re-raised in the consumer, the original error
            items.put((_DONE, exc))
        finally:
            close = getattr(it, "close", None)
            if close is not None:
                close()

    thread = threading.Thread(target=produce, name="lsuv-prefetch", daemon=True)
    thread.start()
    try:
        while True:
            batch, error = items.get()
            if error is not None:
                raise error
            if batch is _DONE:
                return
            yield batch
    finally:
        stop.set()
        while thread.is_alive():  # free the producer blocked on a full queue
            with contextlib.suppress(queue.Empty):
                items.get(timeout=0.05)
        thread.join()
