"""The per-shard record of the pass in progress: one Zarr chunk per shard, a done flag
written after it, so a run killed mid-pass keeps every shard that finished.

``store.RunStore.partial`` opens or starts it; ``passes.py`` reads it back and adds to it.
"""

from __future__ import annotations

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
        """Record shard ``index``; its done flag is written after its moments."""
        with self._writing(f"the record of shard {index}"):
            for key, calls, _ in self._layers:
                count, mean, m2 = self._arrays[key]
                parts = moments[self._names[key]]
                if len(parts) != calls:
                    raise StoreError(
                        f"layer {key!r}: expected {calls} calls per forward, got {len(parts)}"
                    )
                count[index] = np.array([p.count for p in parts], dtype=np.int64)
                mean[index] = torch.stack([p.mean for p in parts]).numpy()
                m2[index] = torch.stack([p.m2 for p in parts]).numpy()
            self._done[index] = 1
