"""The activation cache: a whole solve for about the cost of one forward pass.

Solving layer k needs its outputs over the dataset, with every earlier layer solved. Run
from the input each time (with early exit), pass k recomputes layers 1..k, so L layers
cost up to L/2 forward passes. Instead each shard keeps, between passes, every value that
is still needed at the cut after the layer just measured (the *live values*), so pass k
computes only the operations between layer k-1 and layer k:

    pass k, per batch:  map layer k-1's cached raw output through its update (solve.py)
                        run the graph nodes after layer k-1 up to layer k
                        measure layer k's raw output, keep the live values for pass k+1

Every node then runs once over the whole solve. The model is traced with ``torch.fx`` so
that branches and skip connections (ResNet blocks) work: the live values at a cut are the
nodes computed before it that a later node still reads. The operations are the same, on
the same batches and in the same order, as a run from the input, so a cached pass gives
the same bits as an uncached one; a shard whose cut does not fit the memory budget is
simply recomputed from the input in every pass.

A model ``torch.fx`` cannot trace, or whose solved layers run more than once per forward,
is not cached: its passes run from the input with early exit.
"""

from __future__ import annotations

import inspect
import os
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import torch
from dask.utils import parse_bytes
from torch import fx, nn

from . import moments as mom
from .attention import get_layer
from .errors import first_line
from .hooks import channel_dim, evaluating, in_model_dtype
from .layers import LayerInfo
from .solve import OutputMap, Solution, output_map, transform_output

__all__ = [
    "ActivationCache",
    "Segments",
    "Uncacheable",
    "default_budget",
    "parse_size",
]


class Uncacheable(Exception):
    """Why a model's passes cannot use the activation cache."""


@dataclass
class _ShardState:
    """A shard's cut after layer ``layer`` was measured: per batch, the live values by node
    name (names, not nodes: another thread's trace of the same model may continue it)."""

    layer: int
    envs: list[dict[str, torch.Tensor]]
    sizes: list[int]
    nbytes: int = 0


class Segments:
    """A model as a graph of nodes, cut at its target layers.

    Args:
        model: The model (its modules are shared, not copied).
        layers: The run's target layers in forward order; each must run once per forward.

    Raises:
        Uncacheable: The model cannot be traced, or a layer is called more than once.
    """

    def __init__(self, model: nn.Module, layers: Sequence[LayerInfo]) -> None:
        shared = [i.name for i in layers if i.calls != 1]
        if shared:
            raise Uncacheable(f"layer {shared[0]!r} runs more than once per forward")
        inside = [i.name for i in layers if i.functional]
        if inside:
            raise Uncacheable(
                f"layer {inside[0]!r} is applied functionally (attention, F.linear), where "
                "the traced graph has no module call to cut at"
            )
        try:
            with evaluating(model):  # trace the eval-mode forward, the one passes run
                self.module = fx.symbolic_trace(model, concrete_args=_optional_args(model))
        except Exception as exc:
            reason = first_line(exc, 160)
            raise Uncacheable(f"torch.fx cannot trace {type(model).__name__} ({reason})") from None
        self.nodes = list(self.module.graph.nodes)
        inputs = [n for n in self.nodes if n.op == "placeholder"]
        fixed = [n for n in inputs[1:] if len(n.args) == 1]  # optional ones, at their default
        if not inputs or len(fixed) != len(inputs) - 1:
            raise Uncacheable(f"the traced forward takes {len(inputs)} inputs, not 1")
        self.input = inputs[0]
        self.fixed = {n: n.args[0] for n in fixed}
        self.first = self.nodes.index(inputs[-1]) + 1
        self.by_name = {n.name: n for n in self.nodes}
        self.names = [i.name for i in layers]
        self.positions: list[int] = []
        for name in self.names:
            found = [
                i for i, n in enumerate(self.nodes) if n.op == "call_module" and n.target == name
            ]
            if len(found) != 1:
                raise Uncacheable(f"layer {name!r} appears {len(found)} times in the traced graph")
            self.positions.append(found[0])
        if self.positions != sorted(self.positions):
            raise Uncacheable("the traced graph runs the layers in another order than the model")
        self.dims = [channel_dim(get_layer(model, n)) for n in self.names]
        self.dtypes = [get_layer(model, n).weight.dtype for n in self.names]
        self.layer_at = {p: k for k, p in enumerate(self.positions)}
        index = {n: i for i, n in enumerate(self.nodes)}
        # the last node that reads each value; a value nobody reads dies where it is made
        self.last_use = {n: max((index[u] for u in n.users), default=index[n]) for n in self.nodes}
        self._interpreter = fx.Interpreter(self.module, garbage_collect_values=False)

    def _run(self, env: dict, start: int, stop: int, solved: dict[int, OutputMap]) -> None:
        """Run nodes ``start..stop-1`` on ``env``; map solved layers' outputs; free dead ones."""
        interp = self._interpreter
        interp.env = env
        for i in range(start, stop):
            node = self.nodes[i]
            value = interp.run_node(node)
            k = self.layer_at.get(i)
            if k is not None and k in solved:  # a layer's own, fresh output
                value = transform_output(value, solved[k], self.dims[k], inplace=_owned(value))
            env[node] = value
            for used in node.all_input_nodes:
                if self.last_use[used] <= i and used in env:
                    del env[used]

    def measure(
        self,
        batches: Iterator[torch.Tensor],
        k: int,
        solved: dict[int, Solution],
        device: torch.device,
        state: _ShardState | None,
        keep: bool,
        on_batch: Callable[[int], None] | None = None,
        *,
        compiled: bool = False,
    ) -> tuple[tuple[mom.Moments, ...], _ShardState | None]:
        """Layer ``k``'s output moments over one shard, from its cached cut if it has one.

        Args:
            batches: The shard's input batches (read only when there is no usable cut).
            k: Index of the layer to measure.
            solved: Updates of the layers before ``k``, by layer index.
            device: Where to compute.
            state: The shard's cut after layer ``k - 1`` (else the pass starts from inputs).
            keep: Whether to return the new cut (else it is dropped as the pass goes).
            on_batch: Called with each batch's size as it finishes.
            compiled: Reduce with the compiled kernel (``moments.from_batch``).

        Returns:
            The moments (one call) and the shard's cut after layer ``k`` (or ``None``).
        """
        stop = self.positions[k] + 1
        node = self.nodes[self.positions[k]]
        dim = self.dims[k]
        solved = {j: output_map(sol, device, self.dtypes[j]) for j, sol in solved.items()}
        if state is not None and state.layer == k - 1:  # continue from the cut
            prev = self.nodes[self.positions[k - 1]]
            start = self.positions[k - 1] + 1
            items: Iterator = _drain(state)
        else:  # from the input
            prev, start = None, self.first
            items = ((None, x, x.shape[0]) for x in batches)
        acc = mom.Moments.empty()
        kept, sizes = [], []
        for env, x, n in items:
            if env is None:
                env = {self.input: in_model_dtype(x.to(device, non_blocking=True), self.module),
                       **self.fixed}  # fmt: skip
            else:
                env = {self.by_name[name]: t for name, t in env.items()}
                if prev in env:  # layer k-1 was measured raw: its update applies now
                    raw = env[prev]
                    env[prev] = transform_output(
                        raw, solved[k - 1], self.dims[k - 1], inplace=_owned(raw, env)
                    )
            self._run(env, start, stop, solved)
            acc = mom.merge(acc, mom.from_batch(env[node], dim, compiled=compiled))
            if self.last_use[node] <= self.positions[k]:
                del env[node]  # nothing after the layer reads it
            if keep:
                kept.append({node.name: t for node, t in env.items()})
                sizes.append(n)
            env.clear()
            if on_batch is not None:
                on_batch(n)
        new = _ShardState(k, kept, sizes, _nbytes(kept)) if keep else None
        return (acc.to("cpu"),), new


def _optional_args(model: nn.Module) -> dict[str, object]:
    """The forward's parameters after the input that have defaults, fixed at them: passes
    call ``model(x)``, so an optional mask or flag (timm's ViT) is its default."""
    try:
        params = list(inspect.signature(model.forward).parameters.values())
    except (TypeError, ValueError):
        return {}
    return {
        p.name: p.default
        for p in params[1:]
        if p.default is not inspect.Parameter.empty
        and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
    }


def _owned(value: torch.Tensor, env: dict | None = None) -> bool:
    """Whether ``value`` may be overwritten by its update: a tensor of its own (not a view),
    sharing its storage with no other live value of ``env``."""
    if not isinstance(value, torch.Tensor) or value._base is not None:
        return False
    if env is None:
        return True
    storage = value.untyped_storage().data_ptr()
    return not any(
        t is not value and isinstance(t, torch.Tensor)
        and t.untyped_storage().data_ptr() == storage
        for t in env.values()
    )  # fmt: skip


def _drain(state: _ShardState) -> Iterator[tuple[dict, None, int]]:
    """Hand out a cut's batches one by one, letting go of each (so memory is not doubled)."""
    for i, n in enumerate(state.sizes):
        env, state.envs[i] = state.envs[i], None
        yield env, None, n
    state.envs.clear()


def _nbytes(envs: list[dict]) -> int:
    seen, total = set(), 0
    for env in envs:
        for t in env.values():
            if isinstance(t, torch.Tensor):
                key = (t.untyped_storage().data_ptr(), t.device)
                if key not in seen:
                    seen.add(key)
                    total += t.untyped_storage().nbytes()
    return total


@dataclass
class ActivationCache:
    """Per-shard cuts of one run, within a memory budget.

    Attributes:
        budget: Most bytes of cached activations; past it a shard is recomputed instead.
        token: Identifies the run (and its device) the cuts belong to.
    """

    budget: int
    token: str = ""
    states: dict[int, _ShardState] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def used(self) -> int:
        return sum(s.nbytes for s in self.states.values())

    def take(self, token: str, shard: int) -> _ShardState | None:
        """Remove and return a shard's cut (``None`` if absent or of another run)."""
        with self._lock:
            if token != self.token:
                self.states.clear()
                self.token = token
            return self.states.pop(shard, None)

    def room(self, nbytes: int) -> bool:
        """Whether ``nbytes`` more fit the budget."""
        with self._lock:
            return self.used + nbytes <= self.budget

    def put(self, token: str, shard: int, state: _ShardState) -> bool:
        """Keep a shard's cut if it fits; return whether it was kept."""
        with self._lock:
            if token != self.token or self.used + state.nbytes > self.budget:
                return False
            self.states[shard] = state
            return True


def parse_size(text: str | int | None) -> int | None:
    """Bytes from ``"4GB"`` (4e9), ``"4GiB"``, ``"512MB"``, ``"0"`` or an int, as
    ``dask.utils.parse_bytes`` reads them; ``None`` / ``"auto"`` is ``None``.

    Raises:
        ValueError: Not a size, or a negative one.
    """
    if text is None or (isinstance(text, str) and text.strip().lower() == "auto"):
        return None
    try:
        value = parse_bytes(text)
    except (ValueError, TypeError):
        value = -1
    if isinstance(text, bool) or value < 0:
        raise ValueError(f"not a size: {text!r} (use e.g. 512MB, 4GiB, 0 or auto)")
    return int(value)


def default_budget(device: torch.device) -> int:
    """Half of the memory free now: host RAM for the CPU, device memory for CUDA."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free // 2
    try:
        with open("/proc/meminfo") as f:
            info = dict(line.split(":", 1) for line in f)
        return int(info["MemAvailable"].split()[0]) * 1024 // 2
    except (OSError, KeyError, ValueError):
        return (os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")) // 2
