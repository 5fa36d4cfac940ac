"""Batches other than one tensor: tuples, lists and dicts of tensors, and how a model
takes them.

A batch is a tensor ``(B, ...)``, or a tuple / list / dict whose leaves are tensors that
all share the leading batch dimension (token ids, an ``attention_mask``, ...). Integer
tensors stay integer (token ids); floating ones are float32 on the host until a pass moves
them to the model's device. Every helper here maps over the leaves, so slicing, joining,
moving and hashing work on any such batch.

How a batch meets the model (:func:`call`): ``forward_fn(model, batch)`` when the caller
gives one (the shape NVIDIA ModelOpt, AIMET and HF PEFT's EVA use), else ``model(**batch)``
for a mapping and ``model(batch)`` for a tensor (the data sources keep only the ``x`` of an
``(x, y)`` pair unless a ``forward_fn`` asks for the whole batch).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping, Sequence

import torch
from torch import nn
from torch.utils import _pytree as pytree

from .errors import ConfigError

__all__ = [
    "ForwardFn",
    "MaskFn",
    "call",
    "callable_name",
    "cat",
    "check",
    "describe",
    "empty_like",
    "hash_into",
    "leaves",
    "map_leaves",
    "sample_shape",
    "size",
    "take",
    "to_device",
    "token_mask",
]

#: ``forward_fn(model, batch)``: run the model on one batch (its output is not used).
ForwardFn = Callable[[nn.Module, object], object]

#: ``mask_fn(batch)``: a ``(N, L)`` tensor, true at the positions (tokens) the statistics
#: count; the outputs ``(N, L, C)`` of Linear layers and projections are measured there only.
MaskFn = Callable[[object], torch.Tensor]


def _tensors(batch) -> list[torch.Tensor]:
    return [t for t in pytree.tree_leaves(batch) if isinstance(t, torch.Tensor)]


def check(value, what: str):
    """Return ``value`` as a batch: tensor leaves detached on the host, floating ones float32.

    Raises:
        ValueError: No tensor in it, a scalar tensor, a leaf that is not a tensor, or
            tensors whose leading (batch) dimensions differ; the message names ``what``.
    """
    leaves = pytree.tree_leaves(value)
    if not leaves or not all(isinstance(t, torch.Tensor) for t in leaves):
        kinds = sorted({type(t).__name__ for t in leaves if not isinstance(t, torch.Tensor)})
        what = f"{what} is a {type(value).__name__}" + (
            f" holding {', '.join(kinds) or 'nothing'}" if leaves != [value] else ""
        )
        raise ValueError(
            f"{what}, not a tensor (or a dict / tuple of tensors); pass collate= to build the batch"
        )
    if any(t.ndim == 0 for t in leaves):
        raise ValueError(f"{what} holds a scalar tensor, not a batch")
    sizes = {t.shape[0] for t in leaves}
    if len(sizes) > 1:
        raise ValueError(f"{what} holds tensors of different batch sizes {sorted(sizes)}")

    def host(t: torch.Tensor) -> torch.Tensor:
        t = t.detach().to("cpu")
        return t.float() if t.is_floating_point() else t

    return pytree.tree_map(host, value)


def leaves(batch) -> list[torch.Tensor]:
    """The tensors of a batch, in its structure's order."""
    return _tensors(batch)


def map_leaves(fn: Callable[[torch.Tensor], torch.Tensor], batch):
    """The batch with ``fn`` applied to each of its tensors."""
    return pytree.tree_map(fn, batch)


def describe(batch) -> str:
    """``shape (2, 1, 28, 28)``, with the dtype when not float32; per key for a structure."""
    if isinstance(batch, torch.Tensor):
        dtype = "" if batch.dtype == torch.float32 else f" {batch.dtype}"
        return f"shape {tuple(batch.shape)}{dtype}"
    if isinstance(batch, Mapping):
        return "{" + ", ".join(f"{k!r}: {describe(v)}" for k, v in batch.items()) + "}"
    return "(" + ", ".join(describe(v) for v in batch) + ")"


def size(batch) -> int:
    """The number of samples in a batch (the leading dimension of its tensors)."""
    return _tensors(batch)[0].shape[0]


def sample_shape(batch) -> tuple | dict | list:
    """The shape of one sample: a tuple for a tensor, the same structure of tuples else."""
    return pytree.tree_map(lambda t: tuple(t.shape[1:]), batch)


def take(batch, start: int, stop: int):
    """Samples ``start..stop-1`` of a batch (views)."""
    return pytree.tree_map(lambda t: t[start:stop], batch)


def cat(batches: Sequence):
    """Join batches of one structure along the batch dimension (a new batch)."""
    if len(batches) == 1:
        return pytree.tree_map(torch.clone, batches[0])
    flat = [pytree.tree_flatten(b) for b in batches]
    spec = flat[0][1]
    joined = [torch.cat(parts) for parts in zip(*(leaves for leaves, _ in flat), strict=True)]
    return pytree.tree_unflatten(joined, spec)


def empty_like(shape):
    """An empty batch whose samples have ``shape`` (from :func:`sample_shape`)."""
    if _is_shape(shape):
        return torch.empty((0, *shape))
    return pytree.tree_map(lambda s: torch.empty((0, *s)), shape, is_leaf=_is_shape)


def _is_shape(x) -> bool:
    return isinstance(x, tuple) and all(isinstance(d, int) for d in x)


def to_device(batch, device: torch.device, dtype: torch.dtype | None = None):
    """Move a batch to ``device``; floating tensors to ``dtype`` too when given."""

    def move(t: torch.Tensor) -> torch.Tensor:
        if dtype is not None and t.is_floating_point() and t.dtype != dtype:
            return t.to(device=device, dtype=dtype, non_blocking=True)
        return t.to(device, non_blocking=True)

    return pytree.tree_map(move, batch)


def hash_into(h: hashlib._Hash, batch) -> None:
    """Add a batch's structure, dtypes and bytes to a hash."""
    leaves, spec = pytree.tree_flatten(batch)
    if not isinstance(batch, torch.Tensor):
        h.update(repr(spec).encode())
    for t in leaves:
        if t.dtype != torch.float32:
            h.update(str(t.dtype).encode())
        h.update(t.contiguous().view(torch.uint8).numpy().tobytes())


def token_mask(mask_fn: MaskFn, batch) -> torch.Tensor:
    """``mask_fn(batch)`` as a boolean ``(N, L)`` tensor: True where a position counts.

    Raises:
        ConfigError: It is not a 2-d tensor with one row per sample.
    """
    m = mask_fn(batch)
    n = size(batch)
    if not isinstance(m, torch.Tensor) or m.ndim != 2 or m.shape[0] != n:
        got = tuple(m.shape) if isinstance(m, torch.Tensor) else type(m).__name__
        raise ConfigError(f"mask_fn must return a ({n}, positions) tensor for the batch, got {got}")
    return m.bool()


def callable_name(fn: Callable) -> str:
    """``module.qualname`` of a function (or of a callable object's class), for records."""
    return f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', type(fn).__qualname__)}"


def call(model: nn.Module, batch, forward_fn: ForwardFn | None = None):
    """Run ``model`` on ``batch``: ``forward_fn(model, batch)``, ``model(**batch)`` for a
    mapping, ``model(batch)`` otherwise."""
    if forward_fn is not None:
        return forward_fn(model, batch)
    if isinstance(batch, Mapping):
        return model(**batch)
    return model(batch)
