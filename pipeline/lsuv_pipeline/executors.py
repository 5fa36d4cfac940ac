"""Who runs a pass's shards: the executor protocol, and the inline executor.

An executor is handed the shards of one pass and yields ``(shard, moments)`` pairs as they
finish. It never merges: ``passes.py`` merges in shard order, so the result does not
depend on which executor ran the pass or in what order shards finished.

- :class:`InlineExecutor` (the default) runs shards one after another in this process.
- ``cluster.DaskExecutor`` runs them as tasks on a dask.distributed cluster.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

import torch
from torch import nn

from . import compiled
from .data import Shard, Source
from .data.loading import prefetched
from .numerics import fingerprint
from .shard import CachedRunner, PassPlan, ShardMoments, measure_shard

__all__ = ["Executor", "InlineExecutor"]


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

    def compile(self, dtype: torch.dtype) -> float:
        """Build the compiled moments kernel (``--compile``) wherever the passes run, before
        the first pass; return the seconds it took (the longest build).

        Raises:
            ConfigError: It cannot be built somewhere; the message names where.
        """
        return compiled.prepare(dtype)

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
        self._cached = CachedRunner()

    def run_pass(self, model, source, shards, plan, *, device, on_batch=None):
        for shard in shards:
            if plan.cache is not None:
                moments = self._cached.measure(
                    model,
                    lambda shard=shard: loaded(source, shard, plan.batch_size, device),
                    shard,
                    plan,
                    device,
                    on_batch,
                )
            else:
                batches = loaded(source, shard, plan.batch_size, device)
                moments = measure_shard(model, batches, plan, device=device, on_batch=on_batch)
            yield shard, moments


def loaded(source: Source, shard: Shard, batch_size: int, device: torch.device) -> Iterator:
    """The shard's batches, read ahead on a thread when the source has loader workers
    (pinned for a CUDA device, so the copies overlap the compute)."""
    batches = source.batches(shard, batch_size)
    if source.loader_workers < 1:
        return batches
    return prefetched(batches, pin=device.type == "cuda")
