"""The running estimate of a layer's output moments, shard by shard: how many samples it needed.

A pass merges its shards' moments in shard order (``passes.py``); the prefixes of that fold
are the estimate after the first 1, 2, ... shards, the last one the full split's. For each
prefix ``i`` (``n_i`` samples) this records the pooled mean and std of the layer's output
before the solve, and their deviation from the full split's, relative to its std:

.. math::

    d^{\\mu}_i = \\frac{|\\bar y_i - \\bar y|}{\\sigma},\\qquad
    d^{\\sigma}_i = \\frac{|\\sigma_i - \\sigma|}{\\sigma}

pooled over channels in tensor mode, the largest over channels (each by its own
:math:`\\sigma_c`) in channel mode. Since LSUV maps the output by ``(y - mean) / (std /
target_std)``, these are the running estimate's distances from mean 0 and std target after
LSUV, in units of ``target_std`` (exactly, for a layer solved in one step). The smallest
:math:`n_i` from which every later prefix stays within ``eps`` (:func:`samples_within`) says
how much of the split the statistics needed: Precise-BN (Wu & Johnson 2021) finds
:math:`10^3`-:math:`10^4` samples near-optimal for batch-norm statistics.

This module is pure: moments in, tensors out.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from . import moments as mom
from .solve import Mode

__all__ = ["EPSILONS", "Running", "record", "samples_within"]

#: The levels the report gives a sample count for.
EPSILONS = (1e-3, 1e-4)


@dataclass(frozen=True, eq=False)
class Running:
    """A layer's running estimate after each shard, in shard order (one row per shard).

    Attributes:
        samples: ``(S,)`` int64 samples seen after each shard (the last: the split's size).
        mean: ``(S,)`` float64 output mean before the solve, pooled over channels.
        std: ``(S,)`` float64 output std before the solve, pooled over channels.
        mean_dev: ``(S,)`` float64 :math:`d^{\\mu}`: distance of the running mean from the
            full split's, relative to its std (largest channel in channel mode).
        std_dev: ``(S,)`` float64 :math:`d^{\\sigma}`, likewise for the std.
    """

    samples: torch.Tensor
    mean: torch.Tensor
    std: torch.Tensor
    mean_dev: torch.Tensor
    std_dev: torch.Tensor

    #: The fields, in the order they are stored.
    FIELDS = ("samples", "mean", "std", "mean_dev", "std_dev")

    def __len__(self) -> int:
        return self.samples.numel()


def _relative(delta: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``delta / scale``; 0 where both are 0 (a constant channel), inf where only scale is."""
    out = delta / torch.where(scale > 0, scale, torch.ones_like(scale))
    flat = torch.where(delta == 0, torch.zeros_like(delta), torch.full_like(delta, torch.inf))
    return torch.where(scale > 0, out, flat)


def record(shards: Sequence[Sequence[mom.Moments]], sizes: Sequence[int], *, mode: Mode) -> Running:
    """The running estimate of one layer after each shard.

    Args:
        shards: Per shard in shard order, the layer's per-call moments over it.
        sizes: Samples in each shard.
        mode: ``"tensor"`` (pooled deviations) or ``"channel"`` (the largest channel's).

    Returns:
        One row per shard; its last row is the full split's (its calls pooled, merged in
        the same order as the pass's own result, so bit for bit the same), deviations 0.
    """
    calls = len(shards[0]) if shards else 0
    # per call, the fold of the pass over the shards, keeping every step
    folds = [list(itertools.accumulate((s[c] for s in shards), mom.merge)) for c in range(calls)]
    prefixes = [mom.merge_all(f[i] for f in folds) for i in range(len(shards))]
    full = prefixes[-1]
    pooled = [mom.reduce_channels(p) for p in prefixes]
    mean = torch.stack([p.mean for p in pooled])
    std = torch.stack([p.std for p in pooled])
    if mode == "channel":
        means = torch.stack([p.mean for p in prefixes])  # (S, C)
        stds = torch.stack([p.std for p in prefixes])
        mean_dev = _relative((means - full.mean).abs(), full.std).amax(dim=1)
        std_dev = _relative((stds - full.std).abs(), full.std).amax(dim=1)
    else:
        mean_dev = _relative((mean - mean[-1]).abs(), std[-1])
        std_dev = _relative((std - std[-1]).abs(), std[-1])
    samples = torch.tensor(list(itertools.accumulate(sizes)), dtype=torch.int64)
    return Running(samples, mean, std, mean_dev, std_dev)


def samples_within(running: Running, eps: float) -> int | None:
    """The fewest samples after which the running estimate stayed within ``eps``.

    The smallest ``samples[i]`` such that every prefix from ``i`` on has both deviations
    at most ``eps`` (:class:`Running`), among the prefixes short of the whole split.

    Returns:
        That count, or ``None`` when no prefix short of the whole split stays within
        ``eps`` (only the full split is: it mattered at this level).
    """
    within = (running.mean_dev <= eps) & (running.std_dev <= eps)  # NaN: not within
    outside = torch.nonzero(~within[:-1]).flatten()
    first = int(outside[-1]) + 1 if outside.numel() else 0
    return int(running.samples[first]) if first < len(running) - 1 else None
