"""From measured moments to a layer's new weights: the exact LSUV solve.

A layer computes ``y = W x + b`` per output channel ``c``. With every earlier layer frozen,
the inputs over the dataset are fixed, so one pass gives the mean ``m`` and variance ``v`` of
``y`` and the update

.. math::

    W \\leftarrow W / s,\\qquad b \\leftarrow (b - m) / s,\\qquad s = \\sqrt{v} / \\sigma^*

turns the output into ``(y - m) / s``: mean 0 and standard deviation ``target_std``
(:math:`\\sigma^*`) over the same data, exactly up to rounding (Mishkin & Matas 2015 iterate
this on one batch; with full-data moments one step is exact). In ``"tensor"`` mode (the
paper's) ``s`` and ``m`` are scalars pooled over channels; in ``"channel"`` mode they are per
output channel. A layer without bias gets the scale only; its mean ``m / s`` remains.

A shared layer called twice in a row (its second input depends on its first output) is not
linear in the update, so one step is not exact; ``refine.py`` iterates it.

Where the update goes: a plain ``weight`` parameter is divided by ``s``; a weight-normalized
one (``W = g v / ||v||``, either of torch's two ``weight_norm``) has its magnitude ``g``
divided instead, so the effective weight becomes ``W / s``. Weights whose scale the tool
cannot reach (``spectral_norm`` fixes it at 1; other parametrizations and hooks are
opaque) are reported by :func:`weight_form` and left alone.

On target (:func:`residual`, the one rule the solve, the table and ``verify`` share): the
worst ``|std - target|`` and, for a layer with a bias, the worst ``|mean|``, over the
layer's channels in channel mode or pooled in tensor mode, within the tolerance. A layer
without bias is judged on its std only: its mean is not the solve's to set.

Dead channels (constant over the data: variance exactly 0, e.g. a depthwise conv fed by a
ReLU channel that is 0 on every sample) cannot be given unit std. In tensor mode they are
part of the pooled moments like any channel and the layer is solved as usual. In channel
mode a dead channel gets the layer's pooled scale (its mean is still shifted to 0 when the
layer has a bias), and the std part of the rule skips it: there is no spread to judge.
:func:`dead_channels` names them; the run reports and records them. Only a layer whose
whole output is constant is an error.

This module does not loop over data.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn
from torch.nn import functional as F
from torch.nn.utils import parametrize
from torch.nn.utils.parametrizations import _WeightNorm  # the class weight_norm installs

from . import moments as mom
from .attention import Projection
from .errors import LayerError

__all__ = [
    "Mode",
    "OutputMap",
    "Residual",
    "Solution",
    "WeightForm",
    "check_finite_spread",
    "dead_channels",
    "follower_solution",
    "orthogonal_",
    "output_map",
    "predict",
    "refresh_weight_norm_",
    "rescale_",
    "residual",
    "solve",
    "transform_output",
    "weight_form",
]

Mode = Literal["tensor", "channel"]
MODES: tuple[str, ...] = ("tensor", "channel")
#: Half-precision dtypes: their models are judged at a wider default tolerance, and output
#: maps on them run in float32 (see :func:`output_map`).
HALF: tuple[torch.dtype, ...] = (torch.float16, torch.bfloat16)


@dataclass(frozen=True)
class Solution:
    """The update of one layer relative to its weights before the solve.

    ``W_new = W / scale`` and ``b_new = (b - shift) / scale``, per output channel
    (``scale``, ``shift`` of shape ``(C,)``) or for the whole layer (shape ``()``).
    Both float64. ``shift`` is zero for a layer without bias.
    """

    scale: torch.Tensor
    shift: torch.Tensor


@dataclass(frozen=True)
class OutputMap:
    """A solution as the map it applies to a layer's outputs, ``y * factor + offset`` with
    ``factor = 1 / scale`` and ``offset = -shift / scale`` (computed in float64), on the
    device and in the dtype of the outputs: built once per pass, applied per batch."""

    factor: torch.Tensor
    offset: torch.Tensor


def output_map(solution: Solution, device: torch.device, dtype: torch.dtype) -> OutputMap:
    """Return the :class:`OutputMap` of ``solution`` for outputs on ``device`` in ``dtype``.

    For half-precision outputs the map is kept in float32 (:func:`transform_output` rounds
    its result to the output's dtype): a bfloat16 ``factor`` would be off by up to 2^-9,
    the same for every value, so every later layer would be solved against outputs whose
    std is off by that much while the final weights are not.
    """
    factor = 1.0 / solution.scale.to(torch.float64)
    offset = -solution.shift.to(torch.float64) * factor
    if dtype in HALF:
        dtype = torch.float32
    return OutputMap(factor.to(device=device, dtype=dtype), offset.to(device=device, dtype=dtype))


@dataclass(frozen=True)
class Residual:
    """How far a layer's output is from the target: worst |mean| and |std - target|.

    ``has_bias=False``: the mean is recorded, not judged (the layer cannot absorb it).
    """

    mean: float
    std: float
    has_bias: bool = True

    def within(self, tol: float) -> bool:
        """Whether the layer is on target within ``tol`` (see the module docstring)."""
        return self.std <= tol and (not self.has_bias or self.mean <= tol)


def _view(m: mom.Moments, mode: Mode) -> mom.Moments:
    return mom.reduce_channels(m) if mode == "tensor" else m


def check_finite_spread(m: mom.Moments, *, layer: str) -> None:
    """Raise :class:`LayerError` when a layer's output cannot be rescaled.

    Args:
        m: Per-channel moments of the layer's output.
        layer: Layer name, for the message.

    Raises:
        LayerError: Nothing was measured, a moment is NaN / infinite, or every channel is
            constant (a single dead channel is not an error: see :func:`dead_channels`).
    """
    if m.count == 0:
        raise LayerError(f"layer {layer!r}: no output was measured (empty dataset?)")
    if not (torch.isfinite(m.mean).all() and torch.isfinite(m.m2).all()):
        bad = (~(torch.isfinite(m.mean) & torch.isfinite(m.m2))).nonzero().flatten().tolist()
        raise LayerError(
            f"layer {layer!r}: output mean/variance is not finite in channel(s) "
            f"{_list(bad)} over {m.count} values per channel (NaN or inf in the input or "
            "in an earlier layer)"
        )
    if not (m.m2 > 0).any():
        raise LayerError(
            f"layer {layer!r}: its whole output is constant (every one of its {m.channels} "
            f"channel(s) over {m.count} values; channel 0 is {m.mean.flatten()[0].item():.6g}),"
            " so it cannot be rescaled to unit std: check the layers before it, or leave it "
            "out with --exclude"
        )


def dead_channels(m: mom.Moments) -> list[int]:
    """The output channels that are constant over the data (variance exactly 0)."""
    return (m.m2.flatten() <= 0).nonzero().flatten().tolist()


def _list(idx: list[int], limit: int = 8) -> str:
    head = ", ".join(map(str, idx[:limit]))
    return head + (f", ... ({len(idx)} in all)" if len(idx) > limit else "")


def solve(
    m: mom.Moments, *, mode: Mode, target_std: float, has_bias: bool, layer: str = "?"
) -> Solution:
    """Return the exact one-step update for a layer whose output has moments ``m``.

    Args:
        m: Per-channel moments of the layer's output over the dataset.
        mode: ``"tensor"`` (one scale for the layer) or ``"channel"`` (one per channel).
        target_std: The standard deviation to reach.
        has_bias: Whether the layer has a bias to absorb the mean.
        layer: Layer name, for error messages.

    Returns:
        The :class:`Solution` ``s = sqrt(v) / target_std``, shift ``m`` (0 without bias).

    Raises:
        LayerError: See :func:`check_finite_spread`.
    """
    check_finite_spread(m, layer=layer)
    v = _view(m, mode)
    scale = v.var.sqrt() / target_std
    if mode == "channel":  # a dead channel keeps the layer's pooled scale
        pooled = mom.reduce_channels(m).var.sqrt() / target_std
        scale = torch.where(v.m2 > 0, scale, pooled)
    shift = v.mean.clone() if has_bias else torch.zeros_like(v.mean)
    return Solution(scale=scale.cpu(), shift=shift.cpu())


def residual(m: mom.Moments, *, mode: Mode, target_std: float, has_bias: bool = True) -> Residual:
    """Return the worst |mean| and |std - target| of an output with moments ``m``.

    NaN moments give infinite residuals, so they are never within a tolerance.
    """
    v = _view(m, mode)
    mean = v.mean.abs().max().item()
    live = v.m2 > 0 if mode == "channel" else torch.ones_like(v.m2, dtype=torch.bool)
    std = (v.std - target_std).abs()[live].max().item() if live.any() else float("inf")
    return Residual(
        mean=mean if mean == mean else float("inf"),
        std=std if std == std else float("inf"),
        has_bias=has_bias,
    )


def predict(before: mom.Moments, solution: Solution) -> mom.Moments:
    """Moments of ``(y - shift) / scale`` given those of ``y`` (per channel or pooled)."""
    return mom.Moments(
        count=before.count,
        mean=(before.mean - solution.shift) / solution.scale,
        m2=before.m2 / solution.scale.square(),
    )


def _channel_view(module: nn.Module, s: torch.Tensor) -> tuple[torch.Tensor, tuple[int, ...]]:
    """Return ``s`` shaped to broadcast over ``module.weight`` and the weight's view shape."""
    w = module.weight
    if s.ndim == 0:
        return s, tuple(w.shape)
    if isinstance(module, nn.modules.conv._ConvTransposeNd):
        # weight (in, out / groups, *k); output channel g * (out / groups) + j
        g = module.groups
        shape = (g, w.shape[0] // g, w.shape[1], *w.shape[2:])
        return s.view(g, 1, w.shape[1], *([1] * (w.ndim - 2))), shape
    return s.view(-1, *([1] * (w.ndim - 1))), tuple(w.shape)  # weight (out, ...)


def transform_output(
    y: torch.Tensor, out_map: OutputMap, channel_dim: int, *, inplace: bool = False
) -> torch.Tensor:
    """Return ``(y - shift) / scale``: the layer's output as if its update were applied.

    Computed as one fused ``y * factor + offset`` (:func:`output_map`). During the solve the
    model keeps its initial weights and each solved layer's output goes through this map
    instead: the same values up to float32 rounding as running the rescaled weights, and
    the same bits however a pass runs (from the input, or from cached activations). The
    final weights are computed once at the end with :func:`rescale_`.

    On the CPU, for conv outputs (channels in dim 1), the map runs as an inference-mode
    batch norm of mean 0, variance 1 and eps 0, whose affine terms are then exactly
    ``factor`` and ``offset``: the same fused multiply-add per value as ``torch.addcmul``,
    in half its time (single thread, ``(256, 32, 19, 19)``: 0.9 ms against 1.9 ms).

    ``inplace=True`` writes the result over ``y`` (which the caller owns: a cached
    output, or a layer's fresh output) with the same kernel and the same bits: no second
    buffer of the output's size, and no fresh pages to fault in (single thread, a cut's
    ``(256, 32, 19, 19)`` batch out of cache: 2.3 ms against 3.0 ms).
    """
    factor, offset = out_map.factor, out_map.offset
    if (
        y.device.type == "cpu"
        and y.ndim > 2
        and channel_dim % y.ndim == 1
        and y.dtype == factor.dtype
        and y.dtype in (torch.float32, torch.float64)
    ):
        c = y.shape[1]
        zero, one = torch.zeros(c, dtype=y.dtype), torch.ones(c, dtype=y.dtype)
        # contiguous affine terms: batch norm's fused kernel (a strided one takes another)
        weight, bias = factor.expand(c).contiguous(), offset.expand(c).contiguous()
        if inplace and y.is_contiguous():
            empty = y.new_empty(0)
            torch.ops.aten.native_batch_norm.out(
                y, weight, bias, zero, one, False, 0.0, 0.0, out=y, save_mean=empty,
                save_invstd=empty.clone(),
            )  # fmt: skip
            return y
        return F.batch_norm(y, zero, one, weight, bias, eps=0.0)
    view = [1] * y.ndim
    view[channel_dim] = -1
    if factor.ndim:
        factor = factor.view(view)
    if offset.ndim:
        offset = offset.view(view)
    if y.dtype != factor.dtype:  # a half-precision y: the map in float32, rounded once
        mapped = torch.addcmul(offset, y.to(factor.dtype), factor)
        return y.copy_(mapped) if inplace else mapped.to(y.dtype)
    return torch.addcmul(offset, y, factor, out=y) if inplace else torch.addcmul(offset, y, factor)


@dataclass(frozen=True)
class WeightForm:
    """Where a layer's weight scale lives.

    Attributes:
        kind: ``"plain"`` (a ``weight`` parameter), ``"weight_norm"`` (the parametrization
            of ``torch.nn.utils.parametrizations.weight_norm``) or ``"weight_norm_hook"``
            (the older ``torch.nn.utils.weight_norm``, a forward pre-hook).
        magnitude: The parameter to divide by the scale (``weight``, or ``g``).
        dim: For weight norm, the dim ``g`` keeps (``-1``: one ``g`` for the whole weight).
    """

    kind: str
    magnitude: torch.Tensor
    dim: int | None = None


def weight_form(module: nn.Module, mode: Mode) -> WeightForm | str:
    """Return where ``module``'s weight scale lives, or why LSUV cannot rescale it."""
    if isinstance(module, Projection):  # a view of its attention module's weight
        return WeightForm("plain", module.weight)
    if parametrize.is_parametrized(module, "bias"):
        return "its bias is computed by a parametrization, which LSUV cannot shift"
    if parametrize.is_parametrized(module, "weight"):
        chain = list(module.parametrizations.weight)
        names = ", ".join(type(p).__name__.lstrip("_") for p in chain)
        if len(chain) != 1 or not isinstance(chain[0], _WeightNorm):
            why = " (it fixes the weight's scale at 1)" if "SpectralNorm" in names else ""
            return f"its weight is computed by the parametrization {names}{why}"
        form = WeightForm("weight_norm", module.parametrizations.weight.original0, chain[0].dim)
    else:
        hooks = [h for h in module._forward_pre_hooks.values() if getattr(h, "name", None)]
        hook = next((h for h in hooks if h.name == "weight"), None)
        if hook is not None and type(hook).__name__ == "WeightNorm":
            form = WeightForm("weight_norm_hook", module.weight_g, hook.dim)
        elif hook is not None:
            why = " (it fixes the weight's scale at 1)" if "Spectral" in type(hook).__name__ else ""
            return f"its weight is computed by the forward pre-hook {type(hook).__name__}{why}"
        elif not isinstance(module._parameters.get("weight"), nn.Parameter):
            return "its weight is not a parameter of the module (computed elsewhere)"
        else:
            return WeightForm("plain", module.weight)
    if mode == "channel" and form.dim != _out_dim(module):
        return (
            f"channel mode needs weight norm over the output channels (dim {_out_dim(module)}), "
            f"its weight norm keeps dim {form.dim}"
        )
    return form


def _out_dim(module: nn.Module) -> int | None:
    """The weight dim that indexes output channels (None: a grouped transposed conv)."""
    if isinstance(module, nn.modules.conv._ConvTransposeNd):
        return 1 if module.groups == 1 else None
    return 0


@torch.no_grad()
def rescale_(module: nn.Module, solution: Solution) -> nn.Module:
    """Apply ``W <- W / scale`` and ``b <- (b - shift) / scale`` in place, in float64.

    The weight's scale is changed where it lives (see :func:`weight_form`): the weight
    itself, or a weight norm's magnitude ``g``, so that the effective weight is ``W / s``.

    Args:
        module: A target layer (conv, transposed conv or linear).
        solution: The update; its scale / shift are scalars or per output channel.

    Returns:
        ``module``.

    Raises:
        LayerError: The module's weight scale cannot be reached (see :func:`weight_form`).
    """
    mode = "channel" if solution.scale.ndim else "tensor"
    form = weight_form(module, mode)
    if isinstance(form, str):
        raise LayerError(f"cannot rescale {type(module).__name__}: {form}")
    w = form.magnitude
    scale = solution.scale.to(device=w.device, dtype=torch.float64)
    if form.kind == "plain":
        s, shape = _channel_view(module, scale)
    else:  # g has the weight's ndim with only ``dim`` kept (or is a scalar for dim -1)
        s, shape = (scale.view([-1 if d == form.dim else 1 for d in range(w.ndim)])
                    if scale.ndim else scale), tuple(w.shape)  # fmt: skip
    new_w = w.detach().to(torch.float64).reshape(shape) / s
    w.copy_(new_w.reshape(w.shape).to(w.dtype))
    if form.kind == "weight_norm_hook":  # recompute the weight the hook derives
        refresh_weight_norm_(module)
    b = module.bias
    if b is not None:
        shift = solution.shift.to(device=b.device, dtype=torch.float64)
        b.copy_(((b.detach().to(torch.float64) - shift) / scale).to(b.dtype))
    return module


@torch.no_grad()
def refresh_weight_norm_(module: nn.Module) -> nn.Module:
    """Recompute the weight an old-style ``weight_norm`` hook derives from ``g`` and ``v``.

    Passes run under ``inference_mode``, where the hook leaves an inference tensor as the
    module's ``weight``; this puts a plain one back (the next forward recomputes it anyway).
    """
    for hook in module._forward_pre_hooks.values():
        if type(hook).__name__ == "WeightNorm":
            setattr(module, hook.name, hook.compute_weight(module))
    return module


def follower_solution(leader: Solution, follower_bias: torch.Tensor | None, shares_bias: bool):
    """The map a layer tied to a solved one sees: same weight ``W / s``, its own bias.

    A follower computes ``W x + b_f``; once the shared weight is ``W / s`` it computes
    ``(y - b_f) / s + b_f = (y - b_f (1 - s)) / s``: a :class:`Solution` with the leader's
    scale and shift ``b_f (1 - s)`` (0 without bias; the leader's own if the bias is shared).
    """
    if shares_bias:
        return leader
    if follower_bias is None:
        return Solution(scale=leader.scale, shift=torch.zeros_like(leader.scale))
    b = follower_bias.detach().to(device="cpu", dtype=torch.float64)
    return Solution(scale=leader.scale, shift=b * (1 - leader.scale))


@torch.no_grad()
def orthogonal_(
    modules: list[nn.Module], *, generator: torch.Generator | None = None
) -> list[nn.Module]:
    """Pre-initialize each layer's weight with an orthonormal matrix (LSUV step I).

    Uses :func:`torch.nn.init.orthogonal_` on the weight flattened to ``(rows, -1)``; biases
    are left as they are (the solve absorbs them).

    Returns:
        ``modules``.
    """
    for module in modules:
        form = weight_form(module, "tensor")
        if isinstance(form, str):
            continue  # not solved, so not pre-initialized either
        if form.kind == "plain":
            nn.init.orthogonal_(module.weight, generator=generator)
            continue
        # weight norm: v orthonormal, g its norms, so that the effective weight is v itself
        v = (
            module.parametrizations.weight.original1
            if form.kind == "weight_norm"
            else (module.weight_v)
        )
        nn.init.orthogonal_(v, generator=generator)
        norms = v.norm() if form.dim == -1 else torch.norm_except_dim(v, 2, form.dim)
        form.magnitude.copy_(norms.reshape(form.magnitude.shape))
    return modules
