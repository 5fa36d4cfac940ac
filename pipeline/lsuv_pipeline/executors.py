"""Running one pass over the shards of a split: the per-shard work and who does it.

A pass measures some layers' output moments over every shard of a split, optionally ending
each forward right after the layer being solved. :func:`measure_shard` is the whole work of
one shard; an executor decides where shards run and hands back ``(shard, moments)`` pairs
as they finish. Executors never merge: the coordinator merges in shard order, so the result
does not depend on which executor ran the pass or in what order shards finished.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from . import moments as mom
from .data import Shard, Source, batches
from .layers import LayerInfo, capture, evaluating

__all__ = [
    "Executor",
    "InlineExecutor",
    "PassPlan",
    "ShardMoments",
    "measure_shard",
    "reproducible",
]


#: Layer name -> per-call moments of one shard.
ShardMoments = dict[str, tuple[mom.Moments, ...]]


@dataclass(frozen=True)
class PassPlan:
    """What one pass measures.

    Attributes:
        layers: Layers whose output moments are accumulated.
        stop_after: End each forward after this layer (early exit), or run it whole.
        batch_size: Samples per forward.
    """

    layers: tuple[LayerInfo, ...]
    stop_after: LayerInfo | None
    batch_size: int


@contextlib.contextmanager
def reproducible(device: torch.device, *, allow_tf32: bool = False) -> Iterator[None]:
    """Pin the numerics of a pass: no TF32, deterministic cuDNN; restored on exit."""
    if device.type != "cuda":
        yield
        return
    saved = (
        torch.backends.cuda.matmul.allow_tf32,
        torch.backends.cudnn.allow_tf32,
        torch.backends.cudnn.deterministic,
        torch.backends.cudnn.benchmark,
    )
    torch.backends.cuda.matmul.allow_tf32 = allow_tf32
    torch.backends.cudnn.allow_tf32 = allow_tf32
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False
    try:
        yield
    finally:
        (
            torch.backends.cuda.matmul.allow_tf32,
            torch.backends.cudnn.allow_tf32,
            torch.backends.cudnn.deterministic,
            torch.backends.cudnn.benchmark,
        ) = saved


def measure_shard(
    model: nn.Module,
    source: Source,
    shard: Shard,
    plan: PassPlan,
    *,
    device: torch.device,
    on_batch: Callable[[int], None] | None = None,
) -> ShardMoments:
    """Run ``model`` over one shard; return each planned layer's output moments per call.

    Returns:
        Layer name -> one :class:`~.moments.Moments` per call in a forward (on the CPU).

    The model runs in eval mode under ``inference_mode``; its own modes are restored after.
    Moments stay on ``device`` until the shard ends (no host sync per batch).
    """
    with (
        evaluating(model),
        torch.inference_mode(),
        reproducible(device),
        capture(model, plan.layers, stop_after=plan.stop_after) as cap,
    ):
        for start, stop in batches(shard, plan.batch_size):
            x = source.batch(start, stop).to(device, non_blocking=True)
            cap.forward(x)
            if on_batch is not None:
                on_batch(stop - start)
    return {name: tuple(m.to("cpu") for m in calls) for name, calls in cap.moments.items()}


class Executor:
    """Runs passes. Subclasses decide where shards run."""

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
        """Yield ``(shard, moments)`` for every shard, in completion order."""
        raise NotImplementedError

    def close(self) -> None:
        """Release whatever the executor started."""

    def __enter__(self) -> Executor:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class InlineExecutor(Executor):
    """Runs every shard in this process, in shard order, on one device."""

    def run_pass(self, model, source, shards, plan, *, device, on_batch=None):
        for shard in shards:
            yield shard, measure_shard(model, source, shard, plan, device=device, on_batch=on_batch)
