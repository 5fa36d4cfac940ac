"""The per-shard record of the pass in progress: one Zarr chunk per shard, a done flag
written after it, so a run killed mid-pass keeps every shard that finished (but for the
one whose record was being written as it was killed: that shard is computed again).

``store.RunStore.partial`` opens or starts it; ``passes.py`` reads it back and adds to it.
"""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np
import torch

from . import moments as mom
from .errors import StoreError

__all__ = ["Partial"]


class Partial:
    """The per-shard moments of the pass in progress, one Zarr chunk per shard.

    Layers are named by module name in and out; their groups are their keys.
    ``writing(what)`` is the store's write guard: every shard is written through it.
    """

    def __init__(self, group, layers: list[tuple[str, int, int]], names: dict, writing) -> None:
        self._layers = layers
        self._names = names  # key -> layer name
        self._writing = writing
        # opened once: looking an array up in its group reads its metadata from disk, which
        # cost more than the writes themselves (about 1 ms each, 10 per shard)
        self._arrays = {
            key: tuple(group[key][n] for n in ("count", "mean", "m2")) for key, _, _ in layers
        }
        self._done = group["done"]
        self._writer: ThreadPoolExecutor | None = None
        self._pending: Future | None = None

    def done(self) -> dict[int, dict[str, tuple[mom.Moments, ...]]]:
        """Shard index -> per-layer per-call moments, for every shard already finished."""
        flags = np.asarray(self._done[...])
        finished = np.flatnonzero(flags).tolist()
        if not finished:
            return {}
        out: dict[int, dict[str, tuple[mom.Moments, ...]]] = {i: {} for i in finished}
        for key, _, _ in self._layers:
            count, mean, m2 = (np.asarray(a[...]) for a in self._arrays[key])
            for i in finished:
                out[i][self._names[key]] = tuple(
                    mom.Moments(
                        int(count[i, c]),
                        torch.from_numpy(mean[i, c].copy()),
                        torch.from_numpy(m2[i, c].copy()),
                    )
                    for c in range(count.shape[1])
                )
        return out

    def put(self, index: int, moments: dict[str, tuple[mom.Moments, ...]]) -> None:
        """Record shard ``index``: its moments, then its done flag.

        The write runs on a thread of its own while the next shard computes (a record waited
        on Zarr about 7 ms per shard, a tenth of a forward pass over a solve of mj on MNIST).
        One record is in flight at a time: this first waits for the one before, so a kill
        loses at most one finished shard besides the one in progress.

        Raises:
            StoreError: The moments do not match the record's layers, or the record before
                could not be written.
        """
        rows = []
        for key, calls, _ in self._layers:
            parts = moments[self._names[key]]
            if len(parts) != calls:
                raise StoreError(
                    f"layer {key!r}: expected {calls} calls per forward, got {len(parts)}"
                )
            rows.append((
                np.array([p.count for p in parts], dtype=np.int64),
                torch.stack([p.mean for p in parts]).numpy(),
                torch.stack([p.m2 for p in parts]).numpy(),
            ))  # fmt: skip
        self.flush()
        if self._writer is None:
            self._writer = ThreadPoolExecutor(1, thread_name_prefix="lsuv-record")
        self._pending = self._writer.submit(self._write, index, rows)

    def _write(self, index: int, rows: list[tuple[np.ndarray, ...]]) -> None:
        with self._writing(f"the record of shard {index}"):
            for (key, _, _), values in zip(self._layers, rows, strict=True):
                for array, value in zip(self._arrays[key], values, strict=True):
                    array[index] = value
            self._done[index] = 1

    def flush(self) -> None:
        """Wait until the record put last is written.

        Raises:
            StoreError: It could not be written.
        """
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.result()

    def close(self) -> None:
        """Wait for the write in flight, then stop the writing thread.

        A write that fails now is not raised: ``close`` runs as a pass ends, whether or not
        something else already stopped it (the success path calls :meth:`flush` first).
        Idempotent.
        """
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.exception()  # waits: a finished shard's record lands before the error
        if self._writer is not None:
            self._writer.shutdown(wait=True)
            self._writer = None
