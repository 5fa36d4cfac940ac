"""What one shard computes: the plan of a pass, and the measurement of one shard.

A pass measures some layers' output moments over every shard of a split, optionally ending
each forward right after the layer being solved (:class:`PassPlan`), or continuing from
the activations cached after the previous layer (:class:`CachePlan`, ``cache.py``).
:func:`measure_shard` and :class:`CachedRunner` are the whole work of one shard, wherever
it runs; who runs it is the executors' business (``executors.py``, ``cluster.py``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import nn

from . import batches as B
from . import moments as mom
from .attention import functional_calls
from .batches import ForwardFn, MaskFn
from .cache import ActivationCache, Segments, default_budget
from .hooks import capture, evaluating, solved_outputs
from .layers import LayerInfo
from .numerics import reproducible
from .solve import Solution

__all__ = ["CachePlan", "CachedRunner", "PassPlan", "ShardMoments", "measure_shard"]

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
        functional: Some of the run's layers are applied functionally (attention): route
            the forward's calls through modules (``attention.functional_calls``).
        forward: The caller's ``forward_fn(model, batch)`` (``batches.call``).
        mask: The caller's ``mask_fn(batch)``: token positions the statistics count.
        compiled: Reduce outputs with the compiled kernel (``RunConfig.compile``).
    """

    layers: tuple[LayerInfo, ...]
    stop_after: LayerInfo | None
    batch_size: int
    allow_tf32: bool = False
    solved: tuple[tuple[str, Solution], ...] = ()
    cache: CachePlan | None = None
    functional: bool = False
    forward: ForwardFn | None = None
    mask: MaskFn | None = None
    compiled: bool = False


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
        functional_calls(model) if plan.functional else contextlib.nullcontext(),
        solved_outputs(model, plan.solved),
        capture(
            model,
            plan.layers,
            stop_after=plan.stop_after,
            forward=plan.forward,
            mask=plan.mask,
            compiled=plan.compiled,
        ) as cap,  # fmt: skip
        closed_after(batches),
    ):
        for x in batches:
            cap.forward(B.to_device(x, device))
            if on_batch is not None:
                on_batch(B.size(x))
    return {name: tuple(m.to("cpu") for m in calls) for name, calls in cap.moments.items()}


@contextlib.contextmanager
def closed_after(batches: Iterator) -> Iterator[Iterator]:
    """Close ``batches`` (a generator, a prefetching reader) on the way out, even on an
    error: a read-ahead thread stops at once, not when the iterator is collected."""
    try:
        yield batches
    finally:
        close = getattr(batches, "close", None)
        if close is not None:
            close()


class CachedRunner:
    """The fx segments of one run's model and the activation cache they fill, in one
    process (the coordinator, or a dask worker thread).

    The segments are rebuilt when the run (its cache token) changes, never reused for
    another model; the cache is given (a worker's threads share one) or made here with
    the plan's budget.
    """

    def __init__(self, cache: ActivationCache | None = None) -> None:
        self.segments: Segments | None = None
        self.token: str | None = None
        self.cache = cache
        self.per_sample = 0  # bytes of a cached cut per sample, last seen

    def measure(self, model, source_batches, shard, plan, device, on_batch) -> ShardMoments:
        """Measure one shard of a cached pass (``plan.cache``); keep its new cut if it fits."""
        spec = plan.cache
        if self.token != spec.token:
            self.segments = Segments(model, spec.layers)
            self.token = spec.token
            self.per_sample = 0
        if self.cache is None:
            budget = spec.budget if spec.budget is not None else default_budget(device)
            self.cache = ActivationCache(budget)
        state = self.cache.take(spec.token, shard.index)
        keep = state is not None or self.cache.room(self.per_sample * len(shard))
        index = {name: k for k, name in enumerate(self.segments.names)}
        solved = {index[name]: sol for name, sol in plan.solved if name in index}
        with (
            contextlib.ExitStack() as stack,
            evaluating(model),
            torch.inference_mode(),
            reproducible(device, allow_tf32=plan.allow_tf32),
        ):
            batches = stack.enter_context(closed_after(source_batches()))
            moments, new = self.segments.measure(
                batches,
                spec.index,
                solved,
                device,
                state,
                keep,
                on_batch,
                compiled=plan.compiled,
            )
        if new is not None:
            self.per_sample = max(self.per_sample, new.nbytes // max(1, len(shard)))
            self.cache.put(spec.token, shard.index, new)
        return {spec.layers[spec.index].name: moments}
