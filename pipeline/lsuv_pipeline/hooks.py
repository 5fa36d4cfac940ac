"""Hooks on a model's target layers: measure their outputs, map them, stop early.

:func:`capture` installs forward hooks that reduce each output to per-channel moments right
inside the hook, before any in-place op that follows the layer (``ReLU(inplace=True)``) can
change it, and optionally stops the forward right after the layer being solved (early
exit), so later layers are never computed. :func:`solved_outputs` maps the outputs of
layers solved so far through their updates. Every hook is removed on exit, even on error.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Protocol

import torch
from torch import nn

from . import moments as mom
from .attention import get_layer
from .batches import ForwardFn, MaskFn, call, map_leaves, token_mask
from .errors import ConfigError
from .solve import Solution, output_map, transform_output


class Target(Protocol):
    """What a hook needs of a target layer (``layers.LayerInfo`` is one)."""

    name: str
    calls: int


__all__ = [
    "Capture",
    "StopForward",
    "Target",
    "capture",
    "channel_dim",
    "evaluating",
    "first_tensor",
    "in_model_dtype",
    "model_dtype",
    "solved_outputs",
]


def channel_dim(module: nn.Module) -> int:
    """Return the output dimension that indexes channels: -1 for Linear, else 1."""
    return -1 if isinstance(module, nn.Linear) else 1


@contextlib.contextmanager
def evaluating(model: nn.Module) -> Iterator[nn.Module]:
    """Put every submodule in eval mode; restore each one's own mode on exit."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for m, training in modes:
            m.training = training


def in_model_dtype(batch, model: nn.Module):
    """Return ``batch`` with its floating tensors in the dtype of ``model``'s first floating
    parameter (a bfloat16 / float16 model runs on bfloat16 / float16 inputs); integer
    tensors (token ids), and everything of a model without floating parameters, as they
    are."""
    dtype = model_dtype(model)
    if dtype is None:
        return batch
    return map_leaves(lambda t: t.to(dtype) if t.is_floating_point() else t, batch)


def model_dtype(model: nn.Module) -> torch.dtype | None:
    """The dtype of ``model``'s first floating parameter (``None``: it has none)."""
    return next((p.dtype for p in model.parameters() if p.is_floating_point()), None)


def first_tensor(value) -> torch.Tensor | None:
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, (tuple, list)) and value and isinstance(value[0], torch.Tensor):
        return value[0]
    return None


@contextlib.contextmanager
def solved_outputs(model: nn.Module, solved: Sequence[tuple[str, Solution]]) -> Iterator[None]:
    """Map each solved layer's output through its update (see ``solve.transform_output``).

    Installed before any capture hook, so a capture on the same layer sees the mapped
    output. Hooks are removed on exit.
    """
    handles = []
    try:
        for name, solution in solved:
            module = get_layer(model, name)
            dim = channel_dim(module)
            out_map = output_map(solution, module.weight.device, module.weight.dtype)

            def hook(mod, inputs, output, out_map=out_map, dim=dim):
                return transform_output(output, out_map, dim)

            handles.append(module.register_forward_hook(hook))
        yield
    finally:
        for h in handles:
            h.remove()


class StopForward(Exception):
    """Raised by a hook to end a forward pass early; caught by :meth:`Capture.forward`."""


class Capture:
    """Hooked model whose forwards accumulate per-channel moments of named layers.

    Attributes:
        moments: Per layer name, the running per-channel moments of each call in a forward
            (one entry for a layer called once), on the activations' device.
    """

    def __init__(
        self,
        model: nn.Module,
        stop_calls: int,
        forward: ForwardFn | None = None,
        mask: MaskFn | None = None,
    ) -> None:
        self.moments: dict[str, list[mom.Moments]] = {}
        self._model = model
        self._stop_calls = stop_calls
        self._forward = forward
        self._mask_fn = mask
        self.mask: torch.Tensor | None = None
        self._calls: dict[str, int] = {}

    def forward(self, batch) -> None:
        """Run the model on a batch (``batches.call``; floating tensors in the model's
        dtype), ending early after the stop layer's last call."""
        self._calls.clear()
        if self._mask_fn is not None:
            self.mask = token_mask(self._mask_fn, batch)
        with contextlib.suppress(StopForward):
            call(self._model, in_model_dtype(batch, self._model), self._forward)

    def kept(self, name: str, out: torch.Tensor, dim: int) -> torch.Tensor:
        """The positions of ``out`` the statistics count: with a token mask ``(N, L)``, those
        it keeps of a Linear's ``(N, L, C)`` output (or sequence-first ``(L, N, C)``); all
        of them for any other output (a conv's, a ``(N, C)`` head's).

        Raises:
            ConfigError: A Linear's output has more than two leading dims that fit neither
                layout: the mask cannot be applied, and counting the padding is not what
                the caller asked for.
        """
        m = self.mask
        if m is None or dim != -1 or out.ndim < 3:
            return out
        lead = tuple(out.shape[:2])
        if lead == tuple(m.shape):
            return out[m]
        if lead == tuple(m.shape[::-1]):
            return out.transpose(0, 1)[m]
        raise ConfigError(
            f"layer {name!r} outputs {tuple(out.shape)}, which the mask_fn's "
            f"{tuple(m.shape)} mask does not fit ((N, L, C) or (L, N, C)): its padding "
            "cannot be left out; leave the layer out with --exclude or give no mask_fn"
        )

    def _call(self, name: str) -> int:
        """Count a call of ``name`` in this forward; return its index."""
        i = self._calls.get(name, 0)
        self._calls[name] = i + 1
        return i

    def _add(self, name: str, call: int, part: mom.Moments) -> None:
        per_call = self.moments.setdefault(name, [])
        if call == len(per_call):
            per_call.append(part)
        else:
            per_call[call] = mom.merge(per_call[call], part)


@contextlib.contextmanager
def capture(
    model: nn.Module,
    layers: Sequence[Target],
    *,
    stop_after: Target | None = None,
    forward: ForwardFn | None = None,
    mask: MaskFn | None = None,
    compiled: bool = False,
) -> Iterator[Capture]:
    """Hook ``layers`` so every forward adds their outputs' moments to the capture.

    Each call of a shared layer keeps its own moments (``Capture.moments[name][call]``);
    the solve pools them, or uses the first call alone. Moments are taken inside the hook,
    so in-place ops after the layer cannot corrupt them. Hooks are removed on exit, even
    on error.

    Args:
        model: The model to run.
        layers: Layers to measure.
        stop_after: End each forward right after this layer's last call of the forward.
        forward: The caller's ``forward_fn(model, batch)`` (``batches.call``).
        mask: The caller's ``mask_fn(batch)``: positions to leave out (``batches.token_mask``).
        compiled: Reduce with the compiled kernel (``moments.from_batch``).

    Yields:
        A :class:`Capture`; call its ``forward`` per batch and read its ``moments``.
    """
    cap = Capture(model, stop_after.calls if stop_after is not None else 0, forward, mask)
    measured = {info.name: info for info in layers}
    hooked = dict(measured)
    if stop_after is not None:
        hooked.setdefault(stop_after.name, stop_after)

    def make_hook(name: str, dim: int):
        measure = name in measured
        stop = stop_after is not None and name == stop_after.name

        def hook(module, inputs, output):
            out = first_tensor(output)
            if out is None:
                return
            call = cap._call(name)
            if measure:
                part = mom.from_batch(cap.kept(name, out, dim), dim, compiled=compiled)
                cap._add(name, call, part)
            if stop and call + 1 >= cap._stop_calls:
                raise StopForward

        return hook

    handles = []
    try:
        for name in hooked:
            module = get_layer(model, name)
            handles.append(module.register_forward_hook(make_hook(name, channel_dim(module))))
        yield cap
    finally:
        for h in handles:
            h.remove()
