"""One pass over a split: resume from its per-shard record, run the shards, merge in order.

::

    shards = source.shards(shard_size)           fixed, whoever runs them
    done   = the shards its record already holds (an interrupted run finished them)
    for (shard, moments) from executor.run_pass(the rest):   in completion order
        check they are finite; record them (one chunk per shard, done flag last)
    merge every layer's per-shard moments IN SHARD ORDER     the same bits on any executor

Like dask's chunk / combine / aggregate split, the executors compute per-shard partials and
this module alone combines them, in a fixed order (:func:`run_shards` hands back the shards
unmerged for a caller that needs each, as the running estimate does: ``running.py``). The
solve (``lsuv.py``) and ``verify`` both run their passes here; verify without a record (it
writes nothing). Ctrl-C stops a pass after the batch in flight (:func:`stop_on_sigint`); the
record keeps every finished shard, so the same command resumes.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from torch import nn

from . import moments as mom
from .data import Shard, Source
from .errors import DataError, Interrupted
from .executors import Executor
from .progress import Progress
from .shard import PassPlan, ShardMoments
from .store import RunStore

__all__ = [
    "PassContext",
    "StopFlag",
    "check_finite",
    "merge_shards",
    "run_pass",
    "run_shards",
    "stop_on_sigint",
]


class StopFlag:
    """Set by the first Ctrl-C; the pass stops after the batch in flight."""

    def __init__(self) -> None:
        self.requested = False


@contextlib.contextmanager
def stop_on_sigint() -> Iterator[StopFlag]:
    """First SIGINT: stop after the current batch. Second: interrupt at once."""
    flag = StopFlag()
    if threading.current_thread() is not threading.main_thread():
        yield flag
        return

    def handler(signum, frame):
        if flag.requested:
            raise KeyboardInterrupt
        flag.requested = True

    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield flag
    finally:
        signal.signal(signal.SIGINT, previous)


@dataclass
class PassContext:
    """Where and how the passes of one run (or one verification) execute.

    Attributes:
        executor: Who runs the shards.
        model: The model the passes run (its weights as the pass needs them).
        device: Where they compute.
        shard_size: Samples per shard.
        progress: Receives a bar per pass.
        stop: Ctrl-C's flag; checked after every batch.
        current: Label of the pass in progress (for an interruption's message).
    """

    executor: Executor
    model: nn.Module
    device: torch.device
    shard_size: int
    progress: Progress
    stop: StopFlag = field(default_factory=StopFlag)
    current: str = ""

    def _advance(self, n: int) -> None:
        self.progress.advance(n)
        if self.stop.requested:
            raise Interrupted(self.current)


def check_finite(source: Source, shard: Shard, moments: ShardMoments) -> None:
    """Stop at the first shard whose outputs are NaN or infinite, naming its samples.

    Raises:
        DataError: A layer's moments over the shard are not finite.
    """
    for name, calls in moments.items():
        if not all(
            bool(torch.isfinite(m.mean).all() and torch.isfinite(m.m2).all()) for m in calls
        ):
            raise DataError(
                f"split {source.split!r} of {source.name!r}, samples {shard.start}.."
                f"{shard.stop - 1}: layer {name or '(model)'!r} gives NaN or infinite outputs "
                "(NaN or inf in those samples, or an overflow in an earlier layer)"
            )


def run_shards(
    ctx: PassContext,
    source: Source,
    plan: PassPlan,
    *,
    label: str,
    record: tuple[RunStore, str] | None = None,
) -> list[tuple[Shard, ShardMoments]]:
    """One pass, unmerged: every shard of the split and its moments, in shard order.

    Args:
        ctx: Where the pass runs.
        source: The split.
        plan: What each shard measures.
        label: The progress bar's label.
        record: ``(store, pass id)``: record every finished shard there, and read back
            the shards an interrupted run of the same pass finished instead of computing
            them again. ``None``: record nothing.

    Returns:
        ``(shard, its per-layer per-call moments)`` for every shard, in shard order.

    Raises:
        DataError: NaN or inf in a shard's outputs.
        Interrupted: Ctrl-C; finished shards stay recorded.
    """
    parts = source.shards(ctx.shard_size)
    results: dict[int, ShardMoments] = {}
    partial = None
    if record is not None:
        store, pass_id = record
        partial = store.partial(
            pass_id, len(parts), [(i.name, i.calls, i.channels) for i in plan.layers]
        )
        results.update(partial.done())
    todo = [s for s in parts if s.index not in results]
    ctx.current = label
    ctx.progress.pass_started(label, source.count)
    if results:  # shards an interrupted run finished
        ctx.progress.advance(sum(len(s) for s in parts if s.index in results))
    try:
        for shard, moments in ctx.executor.run_pass(
            ctx.model, source, todo, plan, device=ctx.device, on_batch=ctx._advance
        ):
            check_finite(source, shard, moments)
            if partial is not None:
                partial.put(shard.index, moments)  # written while the next shard computes
            results[shard.index] = moments
        if partial is not None:
            partial.flush()
    finally:
        if partial is not None:
            partial.close()  # what finished before a failure or Ctrl-C is kept
        ctx.progress.pass_finished()
    return [(s, results[s.index]) for s in parts]


def merge_shards(
    plan: PassPlan, shards: list[tuple[Shard, ShardMoments]]
) -> dict[str, list[mom.Moments]]:
    """Per planned layer, each call's moments merged over ``shards`` in the order given."""
    return {
        info.name: [
            mom.merge_all(moments[info.name][call] for _, moments in shards)
            for call in range(info.calls)
        ]
        for info in plan.layers
    }


def run_pass(
    ctx: PassContext,
    source: Source,
    plan: PassPlan,
    *,
    label: str,
    record: tuple[RunStore, str] | None = None,
) -> dict[str, list[mom.Moments]]:
    """One pass: per planned layer, each call's moments over every shard, in shard order.

    :func:`run_shards` then :func:`merge_shards` (same arguments, errors alike).

    Returns:
        Layer name -> one merged :class:`~.moments.Moments` per call of a forward.
    """
    return merge_shards(plan, run_shards(ctx, source, plan, label=label, record=record))
