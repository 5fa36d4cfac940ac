"""Target layers: which ones, in what order, and hooks that measure their outputs.

LSUV solves conv / linear layers first to last *in the order the forward pass reaches
them*, which need not be the order they were registered in. :func:`trace` finds that order
with one forward pass on a couple of samples, counts how often each layer runs per forward,
and tells whether a later call of a shared layer consumes an earlier call's output (then a
single pass cannot solve it exactly; see ``solve.py``).

:func:`capture` installs forward hooks that reduce each output to per-channel moments right
inside the hook, before any in-place op that follows the layer (``ReLU(inplace=True)``) can
change it, and optionally stops the forward right after the layer being solved (early
exit), so later layers are never computed.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from . import moments as mom
from .errors import ConfigError, ModelError
from .solve import Mode, Solution, output_map, transform_output, weight_form

__all__ = [
    "TARGET_TYPES",
    "Capture",
    "Follower",
    "LayerInfo",
    "LayerPlan",
    "Unsolved",
    "capture",
    "channel_dim",
    "evaluating",
    "plan_layers",
    "select",
    "solved_outputs",
    "trace",
]

TARGET_TYPES: tuple[type[nn.Module], ...] = (
    nn.Conv1d,
    nn.Conv2d,
    nn.Conv3d,
    nn.ConvTranspose1d,
    nn.ConvTranspose2d,
    nn.ConvTranspose3d,
    nn.Linear,
)


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
    """

    name: str
    kind: str
    calls: int
    dependent: bool
    channels: int

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "kind": self.kind,
            "calls": self.calls,
            "dependent": self.dependent,
            "channels": self.channels,
        }

    @classmethod
    def from_dict(cls, d: dict) -> LayerInfo:
        return cls(**d)


def channel_dim(module: nn.Module) -> int:
    """Return the output dimension that indexes channels: -1 for Linear, else 1."""
    return -1 if isinstance(module, nn.Linear) else 1


def out_channels(module: nn.Module) -> int:
    """Return the number of output channels (features) of a target layer."""
    if isinstance(module, nn.Linear):
        return module.out_features
    return module.out_channels


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


def _targets(model: nn.Module) -> dict[nn.Module, str]:
    return {m: name for name, m in model.named_modules() if isinstance(m, TARGET_TYPES)}


def _first_tensor(value) -> torch.Tensor | None:
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, (tuple, list)) and value and isinstance(value[0], torch.Tensor):
        return value[0]
    return None


def trace(model: nn.Module, example: torch.Tensor) -> list[LayerInfo]:
    """Return the model's target layers in the order one forward pass first reaches them.

    Runs one forward on ``example`` (a couple of samples is enough) in eval mode with
    autograd on, to see which later calls of a shared layer consume its earlier outputs.

    Args:
        model: Any module; it is left unchanged, in its original train/eval mode.
        example: A small input batch on the model's device.

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
        out = _first_tensor(output)
        if out is None:
            return
        if module not in calls:
            order.append(module)
            calls[module] = []
        calls[module].append((_first_tensor(inputs), out))

    x = example.detach().clone()
    if x.is_floating_point():
        x.requires_grad_(True)  # so every activation carries a graph to test dependence
    handles = [m.register_forward_hook(hook) for m in targets]
    try:
        with evaluating(model), torch.enable_grad():
            try:
                model(x)
            except Exception as exc:  # the user's model rejected the input
                raise ModelError(
                    f"{type(model).__name__} failed on an input batch of shape "
                    f"{tuple(example.shape)}: {type(exc).__name__}: {exc}"
                ) from exc
            layers = [
                LayerInfo(
                    name=targets[m],
                    kind=type(m).__name__,
                    calls=len(calls[m]),
                    dependent=_calls_depend(calls[m]),
                    channels=out_channels(m),
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


@contextlib.contextmanager
def solved_outputs(model: nn.Module, solved: Sequence[tuple[str, Solution]]) -> Iterator[None]:
    """Map each solved layer's output through its update (see ``solve.transform_output``).

    Installed before any capture hook, so a capture on the same layer sees the mapped
    output. Hooks are removed on exit.
    """
    handles = []
    try:
        for name, solution in solved:
            module = model.get_submodule(name)
            dim = channel_dim(module)
            out_map = output_map(solution, module.weight.device, module.weight.dtype)

            def hook(mod, inputs, output, out_map=out_map, dim=dim):
                return transform_output(output, out_map, dim)

            handles.append(module.register_forward_hook(hook))
        yield
    finally:
        for h in handles:
            h.remove()


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
        return {"name": self.name, "kind": self.kind, "reason": self.reason,
                "position": self.position}  # fmt: skip

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


def _holders(model: nn.Module) -> dict[int, list[tuple[str, str, nn.Module]]]:
    """id(parameter) -> every (module name, parameter name, module) that holds it."""
    out: dict[int, list[tuple[str, str, nn.Module]]] = {}
    for name, module in model.named_modules():
        for pname, p in module._parameters.items():
            if p is not None:
                out.setdefault(id(p), []).append((name, pname, module))
    return out


def plan_layers(
    model: nn.Module,
    traced: Sequence[LayerInfo],
    *,
    include: Sequence[str] = (),
    exclude: Sequence[str] = (),
    mode: Mode = "tensor",
) -> LayerPlan:
    """Decide, before the first pass, which traced layers are solved and name the rest.

    A layer is left as it is, with its reason, when the options leave it out, when its
    weight's scale cannot be reached (``solve.weight_form``: spectral norm, other
    parametrizations or hooks), or when its weight is shared in a way the solve cannot
    account for (:func:`_tie_groups`). Of target layers that share one weight, the first in
    forward order is solved and the later ones are :class:`Follower` s, "tied to" it.

    Raises:
        ConfigError: A pattern matches no layer, or no layer is left to solve.
    """
    chosen = {i.name for i in select(traced, include, exclude)}
    reasons: dict[str, str] = {}
    forms = {}
    for info in traced:
        form = weight_form(model.get_submodule(info.name), mode)
        if info.name not in chosen:
            reasons[info.name] = "left out by --include / --exclude"
        elif isinstance(form, str):
            reasons[info.name] = form
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
        module = model.get_submodule(info.name)
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


class StopForward(Exception):
    """Raised by a hook to end a forward pass early; caught by :meth:`Capture.forward`."""


class Capture:
    """Hooked model whose forwards accumulate per-channel moments of named layers.

    Attributes:
        moments: Per layer name, the running per-channel moments of each call in a forward
            (one entry for a layer called once), on the activations' device.
    """

    def __init__(self, model: nn.Module, stop_calls: int) -> None:
        self.moments: dict[str, list[mom.Moments]] = {}
        self._model = model
        self._stop_calls = stop_calls
        self._calls: dict[str, int] = {}

    def forward(self, x: torch.Tensor) -> None:
        """Run the model on ``x``, ending early after the stop layer's last call."""
        self._calls.clear()
        with contextlib.suppress(StopForward):
            self._model(x)

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
    model: nn.Module, layers: Sequence[LayerInfo], *, stop_after: LayerInfo | None = None
) -> Iterator[Capture]:
    """Hook ``layers`` so every forward adds their outputs' moments to the capture.

    All calls of a shared layer are pooled. Moments are taken inside the hook, so in-place
    ops after the layer cannot corrupt them. Hooks are removed on exit, even on error.

    Args:
        model: The model to run.
        layers: Layers to measure.
        stop_after: End each forward right after this layer's last call of the forward.

    Yields:
        A :class:`Capture`; call its ``forward`` per batch and read its ``moments``.
    """
    cap = Capture(model, stop_after.calls if stop_after is not None else 0)
    measured = {info.name: info for info in layers}
    hooked = dict(measured)
    if stop_after is not None:
        hooked.setdefault(stop_after.name, stop_after)

    def make_hook(name: str, dim: int):
        measure = name in measured
        stop = stop_after is not None and name == stop_after.name

        def hook(module, inputs, output):
            out = _first_tensor(output)
            if out is None:
                return
            call = cap._call(name)
            if measure:
                cap._add(name, call, mom.from_batch(out, dim))
            if stop and call + 1 >= cap._stop_calls:
                raise StopForward

        return hook

    handles = []
    try:
        for name in hooked:
            module = model.get_submodule(name)
            handles.append(module.register_forward_hook(make_hook(name, channel_dim(module))))
        yield cap
    finally:
        for h in handles:
            h.remove()
