"""Target layers: which ones, in what order, and which of them a run leaves and why.

LSUV solves conv / linear layers first to last *in the order the forward pass reaches
them*, which need not be the order they were registered in. :func:`trace` finds that order
with one forward pass on a couple of samples, counts how often each layer runs per forward,
and tells whether a later call of a shared layer consumes an earlier call's output (then a
single pass cannot solve it exactly; see ``solve.py``).

:func:`plan_layers` then decides, before the first pass, which of them a run solves and
names every other one with its reason (left out by the options, a weight whose scale the
solve cannot reach, a weight tied to another module; every other weight: ``coverage.py``).
Attention projections are target layers too (``attention.py``). The hooks that measure
them are in ``hooks.py``.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from . import batches as B
from .attention import Projection, attention_layers, functional_calls, get_layer
from .batches import ForwardFn
from .coverage import TARGET_TYPES, ZERO_INIT, all_zero, weights_not_solved
from .errors import ConfigError, ModelError
from .hooks import evaluating, first_tensor, in_model_dtype
from .solve import Mode, weight_form

__all__ = [
    "TARGET_TYPES",
    "Follower",
    "LayerInfo",
    "LayerPlan",
    "Unsolved",
    "out_channels",
    "plan_layers",
    "select",
    "trace",
]


@dataclass(frozen=True, kw_only=True)
class LayerInfo:
    """A target layer as the forward pass sees it.

    Attributes:
        name: Qualified module name (``model.get_submodule(name)``).
        kind: Class name, e.g. ``"Conv2d"``.
        calls: How many times one forward calls it (shared modules run more than once).
        dependent: A later call's input depends on an earlier call's output, so one
            pass does not solve it exactly.
        channels: Output channels (what channel mode scales separately).
        functional: The forward applies it functionally (an attention projection, a
            Linear's weight in ``F.linear``): passes route its calls through
            ``attention.functional_calls``.
    """

    name: str
    kind: str
    calls: int
    dependent: bool
    channels: int
    functional: bool = False

    def to_dict(self) -> dict:
        d = {
            "name": self.name,
            "kind": self.kind,
            "calls": self.calls,
            "dependent": self.dependent,
            "channels": self.channels,
        }
        if self.functional:  # stores written before attention was solved lack the key
            d["functional"] = True
        return d

    @classmethod
    def from_dict(cls, d: dict) -> LayerInfo:
        return cls(**d)


def out_channels(module: nn.Module) -> int:
    """Return the number of output channels (features) of a target layer."""
    if isinstance(module, nn.Linear):
        return module.out_features
    return module.out_channels


def _targets(model: nn.Module) -> dict[nn.Module, str]:
    """Target layers by object: conv / linear modules and attention projections."""
    found = {m: name for name, m in model.named_modules() if isinstance(m, TARGET_TYPES)}
    return {**found, **attention_layers(model)}


def trace(model: nn.Module, example, forward: ForwardFn | None = None) -> list[LayerInfo]:
    """Return the model's target layers in the order one forward pass first reaches them.

    Runs one forward on ``example`` (a couple of samples is enough) in eval mode with
    autograd on, to see which later calls of a shared layer consume its earlier outputs,
    with attention and functional Linear calls routed through modules
    (``attention.functional_calls``), so those layers are found too.

    Args:
        model: Any module; it is left unchanged, in its original train/eval mode.
        example: A small input batch on the model's device (see ``batches.py``).
        forward: The caller's ``forward_fn(model, batch)``, else ``batches.call``'s default.

    Returns:
        One :class:`LayerInfo` per target layer the forward pass calls. Target layers the
        forward never calls are left out.

    Raises:
        ModelError: The model rejects the input, or has no conv / linear layer that runs.
    """
    targets = _targets(model)
    if not targets:
        raise ModelError(
            f"{type(model).__name__} has no conv or linear layer "
            f"({', '.join(t.__name__ for t in TARGET_TYPES)}); there is nothing to initialize"
        )
    order: list[nn.Module] = []
    calls: dict[nn.Module, list[tuple[torch.Tensor | None, torch.Tensor]]] = {}

    def hook(module, inputs, output):
        out = first_tensor(output)
        if out is None:
            return
        if module not in calls:
            order.append(module)
            calls[module] = []
        calls[module].append((first_tensor(inputs), out))

    # floating inputs carry a graph, so every activation can be tested for dependence
    x = B.map_leaves(lambda t: t.detach().clone().requires_grad_(t.is_floating_point()),
                     in_model_dtype(example, model))  # fmt: skip
    handles = [m.register_forward_hook(hook) for m in targets]
    try:
        with evaluating(model), torch.enable_grad():
            try:
                with functional_calls(model) as routes:
                    B.call(model, x, forward)
            except Exception as exc:  # the user's model rejected the input
                raise ModelError(
                    f"{type(model).__name__} failed on an input batch of {B.describe(example)}"
                    f": {type(exc).__name__}: {exc}{_integer_hint(example)}"
                ) from exc
            layers = [
                LayerInfo(
                    name=targets[m],
                    kind=type(m).__name__,
                    calls=len(calls[m]),
                    dependent=_calls_depend(calls[m]),
                    channels=out_channels(m),
                    functional=m in routes.routed,
                )
                for m in order
            ]
    finally:
        for h in handles:
            h.remove()
    if not layers:
        raise ModelError(
            f"{type(model).__name__} has conv / linear layers but its forward pass "
            "calls none of them"
        )
    return layers


def _integer_hint(batch) -> str:
    """Advice for a model that fails on integer inputs that may be raw images."""
    kinds = {str(t.dtype) for t in B.leaves(batch) if not t.is_floating_point()}
    if not kinds or not all(t.ndim >= 3 for t in B.leaves(batch)):
        return ""
    return (
        f" (the batch holds {', '.join(sorted(kinds))} tensors, passed as they are: "
        "images must be converted to floating point and normalized, in the dataset or in "
        "collate=)"
    )


def _calls_depend(calls: list[tuple[torch.Tensor | None, torch.Tensor]]) -> bool:
    """Whether some call's input depends on an earlier call's output (autograd reachability)."""
    for j in range(1, len(calls)):
        inp = calls[j][0]
        if inp is None or not inp.requires_grad:
            continue
        for i in range(j):
            out = calls[i][1]
            if not out.requires_grad:
                return True  # cannot tell: be safe, the solve then measures and iterates
            (grad,) = torch.autograd.grad(
                inp, out, grad_outputs=torch.ones_like(inp), retain_graph=True, allow_unused=True
            )
            if grad is not None:
                return True
    return False


def select(
    layers: Sequence[LayerInfo], include: Sequence[str] = (), exclude: Sequence[str] = ()
) -> list[LayerInfo]:
    """Keep the layers whose name matches an ``include`` pattern and no ``exclude`` one.

    Patterns are Python regular expressions searched in the qualified module name
    (``re.search``: anchor with ``^`` / ``$``). No ``include`` means every layer.

    Raises:
        ConfigError: A pattern matches no layer, or nothing is left to solve.
    """
    names = [i.name for i in layers]
    for option, patterns in (("--include", include), ("--exclude", exclude)):
        for pattern in patterns:
            if not any(re.search(pattern, n) for n in names):
                raise ConfigError(
                    f"{option} {pattern!r} matches no conv / linear layer; the layers are: "
                    + ", ".join(names[:12])
                    + (f", ... ({len(names)} in all)" if len(names) > 12 else "")
                )
    chosen = [
        i
        for i in layers
        if (not include or any(re.search(p, i.name) for p in include))
        and not any(re.search(p, i.name) for p in exclude)
    ]
    if not chosen:
        raise ConfigError("--include / --exclude leave no layer to solve")
    return chosen


@dataclass(frozen=True, kw_only=True)
class Unsolved:
    """A target layer the run leaves as it is, and why.

    Attributes:
        name: Module name.
        kind: Class name.
        reason: Why it is not solved (left out by the options, tied, not rescalable, ...).
        position: How many solved layers come before it in forward order (for tables).
    """

    name: str
    kind: str
    reason: str
    position: int = 0

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "kind": self.kind,
            "reason": self.reason,
            "position": self.position,
        }

    @classmethod
    def from_dict(cls, d: dict) -> Unsolved:
        return cls(**d)


@dataclass(frozen=True, kw_only=True)
class Follower:
    """A target layer that shares its weight with an earlier, solved one (tied weights).

    Solving the leader rescales the shared weight, so the follower's output changes too:
    passes map it through :func:`~.solve.follower_solution`. It is not solved itself.
    """

    name: str
    leader: str
    shares_bias: bool


@dataclass(frozen=True)
class LayerPlan:
    """What a run solves: the layers in forward order, those it leaves and why, and the
    layers tied to solved ones."""

    layers: list[LayerInfo]
    unsolved: list[Unsolved]
    followers: list[Follower]


def plan_layers(
    model: nn.Module,
    traced: Sequence[LayerInfo],
    *,
    include: Sequence[str] = (),
    exclude: Sequence[str] = (),
    mode: Mode = "tensor",
    reinit: bool = False,
) -> LayerPlan:
    """Decide, before the first pass, which traced layers are solved and name the rest.

    A layer is left as it is, with its reason, when the options leave it out, when its
    weight's scale cannot be reached (``solve.weight_form``: spectral norm, other
    parametrizations or hooks), when its weight is all zero and ``reinit`` (the orthogonal
    pre-init, which draws new weights) is off (:data:`ZERO_INIT`), or when its weight is
    shared in a way the solve cannot account for (:func:`_tie_groups`). Of target layers
    that share one weight, the first in forward order is solved and the later ones are
    :class:`Follower` s, "tied to" it.

    Raises:
        ConfigError: A pattern matches no layer, or no layer is left to solve.
    """
    chosen = {i.name for i in select(traced, include, exclude)}
    reasons: dict[str, str] = {}
    forms = {}
    for info in traced:
        form = weight_form(get_layer(model, info.name), mode)
        if info.name not in chosen:
            reasons[info.name] = "left out by --include / --exclude"
        elif isinstance(form, str):
            reasons[info.name] = form
        elif not reinit and all_zero(get_layer(model, info.name)):
            reasons[info.name] = ZERO_INIT
        forms[info.name] = form
    followers = _tie_groups(model, traced, forms, reasons)
    layers = [i for i in traced if i.name not in reasons]
    if not layers:
        name, why = next(iter(reasons.items()))
        raise ConfigError(f"no layer is left to solve (e.g. {name!r}: {why})")
    unsolved, solved_before = [], 0
    for info in traced:
        if info.name in reasons:
            why = reasons[info.name]
            unsolved.append(
                Unsolved(name=info.name, kind=info.kind, reason=why, position=solved_before)
            )
        else:
            solved_before += 1
    reached = {i.name for i in traced}
    for name, kind, why in weights_not_solved(model, reached):  # named after the layers
        unsolved.append(Unsolved(name=name, kind=kind, reason=why, position=solved_before))
    return LayerPlan(layers, unsolved, followers)


def _tie_groups(model, traced, forms, reasons: dict[str, str]) -> list[Follower]:
    """Find target layers whose weight (or bias) another module holds too; add reasons.

    A group of holders can be solved only if every holder is a target layer of the same
    type and weight shape that the forward reaches, holding the tensor as its ``weight``
    (biases shared only inside the group), and the first of them in forward order is
    solved: then the others follow it. Otherwise (a head tied to an embedding, which runs
    earlier; a weight an unsolved layer holds) every layer of the group is left as it is.
    """
    holders: dict[int, list[tuple[str, str, nn.Module]]] = {}
    for name, module in model.named_modules():
        for pname, p in module._parameters.items():
            if p is not None:
                holders.setdefault(id(p), []).append((name, pname, module))
    order = {i.name: k for k, i in enumerate(traced)}
    followers = []
    done: set[str] = set()
    for info in traced:
        form = forms[info.name]
        if info.name in done or isinstance(form, str):
            continue
        module = get_layer(model, info.name)
        if isinstance(module, Projection):  # a view of its attention module's weights
            owner = module.owner
            params = [p for p in owner._parameters.values() if p is not None]
            others = {n for p in params for n, _, m in holders.get(id(p), []) if m is not owner}
            if others:
                reasons.setdefault(info.name, f"weight tied to {min(others)!r}: rescaling "
                                   "it would change that module too")  # fmt: skip
            continue
        own = f"{info.name}.parametrizations." if info.name else "parametrizations."
        group = [h for h in holders.get(id(form.magnitude), []) if not h[0].startswith(own)]
        bias = module.bias if isinstance(module.bias, nn.Parameter) else None
        bias_holders = holders.get(id(bias), []) if bias is not None else []
        if len(group) == 1 and len(bias_holders) <= 1:
            continue
        names = [n for n, _, _ in group]
        done.update(names)
        why = _untieable(info.name, module, group, bias_holders, order, reasons)
        targets = [n for n in names if n in order]
        if why is not None:
            for n in targets:
                reasons.setdefault(n, why)
            continue
        leader = min(targets, key=order.__getitem__)
        lead = model.get_submodule(leader)
        for n in sorted(targets, key=order.__getitem__):
            if n == leader:
                continue
            follower = model.get_submodule(n)
            shares = follower.bias is not None and follower.bias is lead.bias
            followers.append(Follower(name=n, leader=leader, shares_bias=shares))
            reasons[n] = f"tied to {leader!r} (its weight; solved there)"
    return followers


def _untieable(name, module, group, bias_holders, order, reasons) -> str | None:
    """Why a group of modules sharing a weight cannot be solved as leader and followers."""
    names = {n for n, _, _ in group}
    for n, p, m in group:
        if not isinstance(m, TARGET_TYPES) or p != "weight" or n not in order:
            what = f"{n!r} ({type(m).__name__})" if n else "the model itself"
            return f"weight tied to {what}: rescaling it would change that module too"
        if type(m) is not type(module) or m.weight.shape != module.weight.shape:
            return f"weight tied to {n!r} in another layout ({type(m).__name__})"
    for n, _, m in bias_holders:
        if n not in names:
            return f"bias tied to {n!r} ({type(m).__name__}), which the solve cannot account for"
    leader = min(names, key=order.__getitem__)
    if leader in reasons:
        return f"weight tied to {leader!r}, which is not solved ({reasons[leader]})"
    return None
