"""The layer loop: solve every target layer, first to last, one pass each, then verify.

::

    for each target layer k, in forward order:
        one pass (passes.py): every shard runs up to layer k, from the cached cut after
            layer k-1 when the model allows (cache.py), else from the input with the
            forward stopped right after layer k  ->  k's output moments, in shard order
        record the running estimate after each shard of that pass (running.py)
        solve k (solve.py), iterating when its calls feed each other (refine.py)
        commit k to the store
    final weights = initial weights rescaled by every committed update
    verify: every layer's moments after LSUV per split, and before it (initial weights)

During the solve the model keeps its initial weights; the outputs of solved layers (and
of layers tied to them) go through their updates in every pass (``solve.transform_output``).
Committed layers are read back on a rerun, so a crash loses at most the pass in progress,
whose finished shards are recorded too. This module does no IO of its own: it calls the
store's methods with plain values.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from . import moments as mom
from . import running
from .attention import get_layer
from .batches import ForwardFn, MaskFn
from .config import RunConfig
from .data import Source
from .layers import LayerInfo, LayerPlan
from .models import assign_state_
from .passes import PassContext, merge_shards, run_pass, run_shards
from .refine import Refinement
from .report import LayerStats
from .schema import Section, layer_pass_id
from .shard import CachePlan, PassPlan
from .solve import (
    Residual,
    Solution,
    dead_channels,
    follower_solution,
    predict,
    rescale_,
    residual,
    solve,
)
from .store import RunStore

__all__ = ["LayerLoop", "Setup", "off_target"]


@dataclass
class Setup:
    """What the layer loop works with, built by ``run.py``.

    Attributes:
        config: What to compute.
        plan: The layers to solve, those left, and the tied ones.
        store: The run's store (created, or opened to resume).
        ctx: Where the passes run.
        source: The split the solve runs on.
        allow_tf32: Let CUDA use TF32 in the passes.
        cache_token: Identifies the run's activation cache (``None``: no cache).
        cache_budget: Bytes the cache may hold per process (``None``: automatic).
        forward: The caller's ``forward_fn(model, batch)`` (``batches.call``).
        mask: The caller's ``mask_fn(batch)``: token positions the statistics count.
    """

    config: RunConfig
    plan: LayerPlan
    store: RunStore
    ctx: PassContext
    source: Source
    allow_tf32: bool = False
    cache_token: str | None = None
    cache_budget: int | None = None
    forward: ForwardFn | None = None
    mask: MaskFn | None = None


@dataclass
class LayerLoop:
    """One run's solve: its passes, and the updates of the layers solved so far."""

    setup: Setup
    passes: int = 0
    #: Updates of the layers solved so far, in forward order. The model keeps its initial
    #: weights until the end; passes map solved layers' outputs instead.
    solutions: dict[str, Solution] = field(default_factory=dict)
    #: The running estimate of the last pass of a one-pass layer, written with its commit.
    _estimate: running.Running | None = None

    @property
    def layers(self) -> list[LayerInfo]:
        return self.setup.plan.layers

    def mapped(self) -> dict[str, Solution]:
        """The output maps of a pass: each solved layer's update, and for a layer tied to a
        solved one (it shares the rescaled weight) the map that sharing implies."""
        out = dict(self.solutions)
        model = self.setup.ctx.model
        for f in self.setup.plan.followers:
            if f.leader in self.solutions:
                bias = get_layer(model, f.name).bias
                out[f.name] = follower_solution(self.solutions[f.leader], bias, f.shares_bias)
        return out

    def _plan(self, layers, stop_after, solved=None, cache=None) -> PassPlan:
        config = self.setup.config
        return PassPlan(
            tuple(layers),
            stop_after,
            config.batch_size,
            self.setup.allow_tf32,
            tuple((solved or {}).items()),
            cache,
            functional=any(i.functional for i in self.layers),
            forward=self.setup.forward,
            mask=self.setup.mask,
            compiled=config.compile,
        )

    def layer_pass(
        self, k: int, info: LayerInfo, index: int, trial: Solution | None = None
    ) -> list[mom.Moments]:
        """Pass ``index`` (1-based) of layer ``k``: its per-call output moments.

        Earlier layers' outputs go through their updates; ``trial`` is the update of layer
        ``k`` itself being refined (passes after the first of an iterated layer). The
        passes of an iterated layer are recorded, so a resumed run replays its refinement
        from them instead of measuring again.
        """
        store = self.setup.store
        if info.dependent:
            recorded = store.read_pass(info.name, index)
            if recorded is not None:
                return list(recorded)
        label = f"[{k + 1}/{len(self.layers)}] {info.name}" + (
            f" (pass {index})" if index > 1 else ""
        )
        solved = self.mapped()
        if trial is not None:
            solved[info.name] = trial
        cache = None
        if self.setup.cache_token is not None:
            cache = CachePlan(
                self.setup.cache_token, tuple(self.layers), k, self.setup.cache_budget
            )
        plan = self._plan([info], info, solved, cache)
        record = (store, layer_pass_id(info.name, index))
        shards = run_shards(self.setup.ctx, self.setup.source, plan, label=label, record=record)
        calls = merge_shards(plan, shards)[info.name]
        self.passes += 1
        if index == 1:  # from the recorded shards, so a resumed pass gives the same rows
            estimate = running.record(
                [moments[info.name] for _, moments in shards],
                [len(shard) for shard, _ in shards],
                mode=self.setup.config.mode,
            )
            if info.dependent:  # before its pass is recorded: a resumed refinement has it
                store.write_running(info.name, estimate)
            else:  # written once the layer solves: a layer that cannot leaves nothing
                self._estimate = estimate
        if info.dependent:
            store.write_pass(info.name, index, tuple(calls))
        return calls

    def solve_layer(self, k: int, info: LayerInfo) -> LayerStats:
        """Measure and solve one layer (iterating when its calls feed each other)."""
        config = self.setup.config
        module = get_layer(self.setup.ctx.model, info.name)
        has_bias = getattr(module, "bias", None) is not None
        calls = self.layer_pass(k, info, 1)
        before = mom.merge_all(calls)  # all calls pooled
        # A layer whose calls feed each other starts from its first call alone, whose input
        # does not depend on the layer: the pooled one-step solve overshoots badly there.
        first = calls[0] if info.dependent else before
        rule = {"mode": config.mode, "target_std": config.target_std, "has_bias": has_bias}
        solution = solve(first, layer=info.name, **rule)
        if self._estimate is not None:
            self.setup.store.write_running(info.name, self._estimate)
            self._estimate = None
        dead = dead_channels(before)
        if dead:
            self._note_dead(info.name, dead, before.channels)
        passes, converged = 1, True
        res = residual(predict(before, solution), **rule)
        if info.dependent:
            solution, res, passes = self._refine(k, info, before, solution, rule)
            converged = res.within(config.tol)
            if not converged:
                self.setup.ctx.progress.warn(
                    f"warning: layer {info.name!r} did not converge in {passes} passes "
                    f"(|mean| {res.mean:.2e}, |std - target| {res.std:.2e}, tol {config.tol:g})"
                )
        attrs = {
            "index": k,
            "name": info.name,
            "passes": passes,
            "residual_mean": res.mean,
            "residual_std": res.std,
            "converged": converged,
            "has_bias": has_bias,
            **({"dead_channels": dead} if dead else {}),  # stores without any stay as they were
        }
        self.setup.store.commit_layer(info.name, before, solution, attrs)
        self.solutions[info.name] = solution
        return LayerStats(name=info.name, kind=info.kind, passes=passes, converged=converged,
                          has_bias=has_bias, dead=len(dead))  # fmt: skip

    def _note_dead(self, name: str, dead: list[int], channels: int) -> None:
        how = ("pooled with the others (tensor mode)" if self.setup.config.mode == "tensor"
               else "each keeps the layer's pooled scale; its std is not judged")  # fmt: skip
        shown = ", ".join(map(str, dead[:8])) + (", ..." if len(dead) > 8 else "")
        self.setup.ctx.progress.note(
            f"layer {name!r}: {len(dead)} of {channels} output channel(s) are constant over "
            f"the data (dead: {shown}); {how}"
        )

    def _refine(self, k, info, before, solution, rule):
        """Repeat a layer's pass with accelerated steps until its pooled output is on target."""
        config = self.setup.config
        refinement = Refinement(solution, before, **rule)
        passes = 1
        res = Residual(mean=float("inf"), std=float("inf"), has_bias=rule["has_bias"])
        while passes < config.max_iter:
            passes += 1
            measured = mom.merge_all(self.layer_pass(k, info, passes, trial=solution))
            res = residual(measured, **rule)
            self.setup.ctx.progress.note(
                f"{info.name}: calls feed each other; pass {passes}: |mean| {res.mean:.2e}, "
                f"|std - target| {res.std:.2e}"
            )
            if res.within(config.tol) or passes >= config.max_iter:
                break
            solution = refinement.step(measured)
        return solution, res, passes

    def run(self) -> list[LayerStats]:
        """Solve every layer in order (committed layers are read back from the store), then
        give the model its final weights."""
        store, stats = self.setup.store, []
        for k, info in enumerate(self.layers):
            if not store.committed(info.name):
                stats.append(self.solve_layer(k, info))
                continue
            record = store.read_layer(info.name)
            self.solutions[info.name] = record.solution
            a = record.attrs
            stats.append(
                LayerStats(
                    name=info.name,
                    kind=info.kind,
                    passes=a["passes"],
                    converged=a["converged"],
                    has_bias=a["has_bias"],
                    dead=len(a.get("dead_channels", [])),
                )
            )
        model = self.setup.ctx.model
        for name, solution in self.solutions.items():
            rescale_(get_layer(model, name), solution)
        return stats

    def verify(self, stats, initial, final, holdout: Source | None) -> list[LayerStats]:
        """Measure every layer after LSUV on each split, and before it (initial weights)."""
        config, model = self.setup.config, self.setup.ctx.model
        measured = {config.split: self._section(Section("verify", config.split), self.setup.source)}
        if holdout is not None:
            measured[holdout.split] = self._section(Section("verify", holdout.split), holdout)
        assign_state_(model, initial)
        try:
            before = self._section(Section("before", config.split), self.setup.source)
        finally:
            assign_state_(model, final)
        return [
            LayerStats(
                name=s.name,
                kind=s.kind,
                passes=s.passes,
                converged=s.converged,
                has_bias=s.has_bias,
                dead=s.dead,
                before=before[s.name],
                after={split: m[s.name] for split, m in measured.items()},
            )
            for s in stats
        ]

    def _section(self, section: Section, source: Source) -> dict[str, mom.Moments]:
        """Every layer's moments over a split, measured once and kept in the store."""
        store, names = self.setup.store, [i.name for i in self.layers]
        if store.section_complete(section, names):
            return {n: store.read_moments(section, n) for n in names}
        label = f"{'verify' if section.kind == 'verify' else 'initial'} {section.split}"
        plan = self._plan(self.layers, None)
        calls = run_pass(self.setup.ctx, source, plan, label=label, record=(store, section.path))
        pooled = {n: mom.merge_all(c) for n, c in calls.items()}
        for name in names:
            store.write_moments(section, name, pooled[name])
        return pooled


def off_target(stats: list[LayerStats], config: RunConfig) -> list[str]:
    """The solved layers whose moments on the solve split miss ``config.tol``."""
    return [
        s.name
        for s in stats
        if s.on_target(config.split, mode=config.mode, target_std=config.target_std, tol=config.tol)
        is False
    ]
