"""The sequential solve: every target layer, first to last, one pass each, then verify.

::

    for each target layer k, in forward order:
        every shard: forward with early exit after k  ->  per-shard moments of k's output
        merge the shard moments in shard order        ->  solve  ->  rescale k
        commit k to the store (moments before, scale, shift)
    final weights; verify: every layer's moments before (initial weights) and after LSUV

This module wires the others together and reports progress; the math is in ``solve.py``,
the hooks in ``layers.py``, the IO in ``store.py``.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from . import moments as mom
from .config import RunConfig
from .data import DatasetSpec, Source, open_source, resolve_root, shards
from .errors import ConfigError, StoreError
from .executors import Executor, InlineExecutor, PassPlan
from .layers import LayerInfo, trace
from .models import ModelSpec, build_model
from .report import LayerStats, format_table
from .solve import Refinement, Residual, Solution, orthogonal_, rescale_, residual, solve
from .store import RunStore, layer_key, versions

__all__ = ["Progress", "RunResult", "TqdmProgress", "compute", "resolve_device"]


class Progress:
    """Receives progress events; the default ignores them."""

    def pass_started(self, label: str, total: int) -> None:
        """A pass over ``total`` samples begins."""

    def advance(self, n: int) -> None:
        """``n`` more samples of the current pass are done."""

    def pass_finished(self) -> None:
        """The current pass ended."""

    def note(self, text: str) -> None:
        """A message worth showing between passes."""


class TqdmProgress(Progress):
    """One tqdm bar per pass on stderr, messages between them."""

    def __init__(self) -> None:
        self._bar = None

    def pass_started(self, label: str, total: int) -> None:
        from tqdm.auto import tqdm

        self._bar = tqdm(total=total, desc=label, unit="img", unit_scale=True, leave=True)

    def advance(self, n: int) -> None:
        if self._bar is not None:
            self._bar.update(n)

    def pass_finished(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def note(self, text: str) -> None:
        from tqdm.auto import tqdm

        tqdm.write(text)


@dataclass
class RunResult:
    """What :func:`compute` did.

    Attributes:
        path: The run store.
        model: The model, now initialized.
        config: The configuration it ran.
        layers: Per-layer statistics, in forward order.
        passes: Passes over the solve split, verification excluded.
        seconds: Wall time of the solve (passes and writes), verification excluded.
    """

    path: Path
    model: nn.Module
    config: RunConfig
    layers: list[LayerStats] = field(default_factory=list)
    passes: int = 0
    seconds: float = 0.0

    def table(self) -> str:
        """The per-layer table: mean/std before, after on each measured split."""
        splits = [self.config.split] + ([self.config.holdout] if self.config.holdout else [])
        return format_table(
            self.layers,
            splits=splits,
            solved=self.config.split,
            target_std=self.config.target_std,
            tol=self.config.tol,
        )


def resolve_device(device: str | torch.device | None) -> torch.device:
    """Return ``device``; ``"auto"`` / ``None`` is CUDA when available, else the CPU.

    Raises:
        ConfigError: The device is unknown or not available here.
    """
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        dev = None
    if dev is None or dev.type not in ("cpu", "cuda"):
        raise ConfigError(f"unknown --device {str(device)!r}; use auto, cpu, cuda or cuda:N")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device {str(device)!r}: CUDA is not available here")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ConfigError(
            f"--device {str(device)!r}: only {torch.cuda.device_count()} CUDA device(s) here"
        )
    return dev


def _open_sources(config: RunConfig, root: Path, download: bool) -> tuple[Source, Source | None]:
    def spec(split: str) -> DatasetSpec:
        return DatasetSpec(
            name=config.dataset, split=split, root=str(root), limit=config.limit, download=download
        )

    train = open_source(spec(config.split))
    holdout = None
    if config.verify and config.holdout is not None:
        if config.holdout == config.split:
            raise ConfigError(
                f"the held-out split must differ from the solve split {config.split!r}"
            )
        holdout = open_source(spec(config.holdout))
    return train, holdout


def _prepare_out(out: Path, overwrite: bool) -> None:
    if not out.exists():
        return
    if not overwrite:
        raise StoreError(f"{str(out)!r} already exists; pass --overwrite to replace it")
    RunStore.open(out)  # refuse to delete anything that is not a run store
    shutil.rmtree(out)


class _Solver:
    """One run's state: model, data, store and executor, and the passes over them."""

    def __init__(self, config, model, train, store, executor, device, progress):
        self.config = config
        self.model = model
        self.train = train
        self.store = store
        self.executor = executor
        self.device = device
        self.progress = progress
        self.shards = shards(train.count, config.shard_size)
        self.passes = 0

    def measure(
        self,
        layers: Sequence[LayerInfo],
        *,
        stop_after: LayerInfo | None,
        label: str,
        source: Source | None = None,
    ) -> dict[str, list[mom.Moments]]:
        """One pass: per layer, each call's moments over every shard, merged in shard order."""
        source = source or self.train
        parts = (
            shards(source.count, self.config.shard_size)
            if source is not self.train
            else self.shards
        )
        plan = PassPlan(tuple(layers), stop_after, self.config.batch_size)
        self.progress.pass_started(label, source.count)
        results: dict[int, dict[str, mom.Moments]] = {}
        try:
            for shard, moments in self.executor.run_pass(
                self.model, source, parts, plan, device=self.device, on_batch=self.progress.advance
            ):
                results[shard.index] = moments
        finally:
            self.progress.pass_finished()
        return {
            info.name: [
                mom.merge_all(results[s.index][info.name][call] for s in parts)
                for call in range(len(results[parts[0].index][info.name]))
            ]
            for info in layers
        }

    def solve_layer(self, k: int, info: LayerInfo) -> LayerStats:
        """Measure, solve and rescale one layer (iterating when its calls feed each other)."""
        config = self.config
        module = self.model.get_submodule(info.name)
        has_bias = getattr(module, "bias", None) is not None
        n = len(self._layers)
        calls = self.measure([info], stop_after=info, label=f"[{k + 1}/{n}] {info.name}")[info.name]
        self.passes += 1
        before = mom.merge_all(calls)  # all calls pooled
        # A layer whose calls feed each other starts from its first call alone, whose input
        # does not depend on the layer: the pooled one-step solve overshoots badly there.
        first = calls[0] if info.dependent else before
        solution = solve(
            first,
            mode=config.mode,
            target_std=config.target_std,
            has_bias=has_bias,
            layer=info.name,
        )
        base = [p.detach().clone() for p in (module.weight, module.bias) if p is not None]
        rescale_(module, solution)
        passes = 1
        res = residual(_predict(before, solution), mode=config.mode, target_std=config.target_std)
        converged = True
        if info.dependent:
            solution, res, passes = self._refine(k, info, module, base, before, solution, has_bias)
            converged = res.within(config.tol)
            if not converged:
                self.progress.note(
                    f"warning: layer {info.name!r} did not converge in {passes} passes "
                    f"(|mean| {res.mean:.2e}, |std - target| {res.std:.2e}, tol {config.tol:g})"
                )
        self.store.commit_layer(
            layer_key(info.name),
            before,
            solution,
            {
                "index": k,
                "name": info.name,
                "passes": passes,
                "residual_mean": res.mean,
                "residual_std": res.std,
                "converged": converged,
                "has_bias": has_bias,
            },
        )
        return LayerStats(
            name=info.name, kind=info.kind, passes=passes, converged=converged, has_bias=has_bias
        )

    def _refine(self, k, info, module, base, before, solution, has_bias):
        """Repeat a layer's pass with secant steps until its pooled output is on target."""
        config = self.config
        refinement = Refinement(
            solution, before, mode=config.mode, target_std=config.target_std, has_bias=has_bias
        )
        passes = 1
        res = Residual(mean=float("inf"), std=float("inf"))
        while passes < config.max_iter:
            label = f"[{k + 1}/{len(self._layers)}] {info.name} (pass {passes + 1})"
            measured = mom.merge_all(self.measure([info], stop_after=info, label=label)[info.name])
            self.passes += 1
            passes += 1
            res = residual(measured, mode=config.mode, target_std=config.target_std)
            self.progress.note(
                f"{info.name}: calls feed each other; pass {passes}: |mean| {res.mean:.2e}, "
                f"|std - target| {res.std:.2e}"
            )
            if res.within(config.tol) or passes >= config.max_iter:
                break
            solution = refinement.step(measured)
            with torch.no_grad():
                for p, b in zip(
                    (q for q in (module.weight, module.bias) if q is not None), base, strict=True
                ):
                    p.copy_(b)
            rescale_(module, solution)
        return solution, res, passes

    def run(self, layers: list[LayerInfo]) -> list[LayerStats]:
        self._layers = layers
        return [self.solve_layer(k, info) for k, info in enumerate(layers)]


def _predict(before: mom.Moments, solution: Solution) -> mom.Moments:
    """Moments of ``(y - shift) / scale`` given those of ``y`` (per channel or pooled)."""
    return mom.Moments(
        count=before.count,
        mean=(before.mean - solution.shift) / solution.scale,
        m2=before.m2 / solution.scale.square(),
    )


def compute(
    config: RunConfig,
    out: str | Path,
    *,
    model: nn.Module | None = None,
    data_root: str | Path | None = None,
    download: bool = True,
    device: str | torch.device | None = "auto",
    executor: Executor | None = None,
    progress: Progress | bool = False,
    overwrite: bool = False,
) -> RunResult:
    """Compute the full-dataset LSUV init of a model and write it to a run store.

    Args:
        config: What to compute.
        out: Path of the run store to write (a Zarr group).
        model: A model to initialize in place; by default ``config.model`` is built with
            ``config.seed``.
        data_root: Folder with the datasets (default ``$LSUV_DATA_ROOT``, else ``data/``).
        download: Download a missing dataset.
        device: ``"auto"`` (CUDA if available), ``"cpu"``, ``"cuda"``, ``"cuda:1"``, ...
        executor: Where shards run (default: inline, in this process).
        progress: ``True`` for progress bars on stderr, or a :class:`Progress`.
        overwrite: Replace an existing run store at ``out``.

    Returns:
        A :class:`RunResult` with the initialized model and its per-layer statistics.

    Raises:
        LsuvError: Bad configuration, data, model or store, or a layer that cannot be solved.
    """
    progress = TqdmProgress() if progress is True else (progress or Progress())
    dev = resolve_device(device)
    train, holdout = _open_sources(config, resolve_root(data_root), download)
    if model is None:
        model = build_model(
            ModelSpec(name=config.model, kwargs=config.model_kwargs),
            seed=config.seed,
            in_channels=train.sample_shape[0],
            num_classes=train.num_classes or 10,
        )
    model.to(dev)
    layers = trace(model, train.batch(0, min(2, train.count)).to(dev))
    if config.orthogonal:
        generator = torch.Generator(device=dev).manual_seed(config.seed)
        orthogonal_([model.get_submodule(i.name) for i in layers], generator=generator)
    out = Path(out)
    _prepare_out(out, overwrite)
    store = RunStore.create(
        out,
        {
            "config": config.to_dict(),
            "dataset": train.describe(),
            "holdout": holdout.describe() if holdout is not None else None,
            "model": {"spec": config.model, "class": type(model).__name__},
            "layers": [{**i.to_dict(), "key": layer_key(i.name)} for i in layers],
            "status": "running",
            "device": dev.type,
            "versions": versions(),
        },
    )
    initial = {k: v.detach().clone() for k, v in model.state_dict().items()}
    store.write_state("initial", initial)

    executor = executor or InlineExecutor()
    solver = _Solver(config, model, train, store, executor, dev, progress)
    started = time.perf_counter()
    stats = solver.run(layers)
    final = {k: v.detach().clone() for k, v in model.state_dict().items()}
    store.write_state("final", final)
    seconds = time.perf_counter() - started

    if config.verify:
        stats = _verify(solver, layers, stats, initial, final, holdout)
    store.update_attrs(status="complete")
    return RunResult(out, model, config, stats, solver.passes, seconds)


def _verify(solver, layers, stats, initial, final, holdout) -> list[LayerStats]:
    """Measure every layer after LSUV on each split, and before it (initial weights)."""
    config, store = solver.config, solver.store

    def pooled(label: str, source: Source | None = None) -> dict[str, mom.Moments]:
        calls = solver.measure(layers, stop_after=None, label=label, source=source)
        return {name: mom.merge_all(c) for name, c in calls.items()}

    measured: dict[str, dict[str, mom.Moments]] = {}
    measured[config.split] = pooled(f"verify {config.split}")
    if holdout is not None:
        measured[holdout.split] = pooled(f"verify {holdout.split}", holdout)
    solver.model.load_state_dict(initial)
    try:
        before = pooled(f"initial {config.split}")
    finally:
        solver.model.load_state_dict(final)
    for info in layers:
        key = layer_key(info.name)
        store.write_moments(f"before/{config.split}", key, before[info.name])
        for split, moments in measured.items():
            store.write_moments(f"verify/{split}", key, moments[info.name])
    return [
        LayerStats(
            name=s.name,
            kind=s.kind,
            passes=s.passes,
            converged=s.converged,
            has_bias=s.has_bias,
            before=before[s.name],
            after={split: m[s.name] for split, m in measured.items()},
        )
        for s in stats
    ]
