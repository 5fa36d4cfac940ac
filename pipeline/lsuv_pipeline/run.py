"""The sequential solve: every target layer, first to last, one pass each, then verify.

::

    for each target layer k, in forward order:
        every shard: run up to layer k  ->  per-shard moments of k's output
            (from the cached cut after layer k-1 when the model allows, cache.py;
             else from the input, with the forward stopped right after layer k)
        merge the shard moments in shard order  ->  solve k  ->  commit k to the store
    final weights = initial weights rescaled by every committed update
    verify: every layer's moments before (initial weights) and after LSUV, per split

During the solve the model keeps its initial weights; the outputs of solved layers go
through their updates (``solve.transform_output``). Every finished shard is recorded in the
store as it arrives, and every solved layer is committed, so a rerun of the same command
after a crash reads the committed updates back, keeps the finished shards of the pass in
progress, and ends with the same bytes as an uninterrupted run. A finished store with the
same config and data is up to date: a rerun does no pass.

This module wires the others together and reports progress; the math is in ``solve.py``,
the hooks in ``layers.py``, the cache in ``cache.py``, the IO in ``store.py``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import signal
import threading
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from . import moments as mom
from .cache import Segments, Uncacheable, parse_size
from .config import RunConfig
from .data import DatasetSpec, Source, limited, open_source, resolve_root, source_from
from .errors import (
    ConfigError,
    DataError,
    Interrupted,
    LsuvError,
    OffTarget,
    ReadOnlyStore,
    StoreError,
)
from .executors import (
    CachePlan,
    DaskExecutor,
    Executor,
    PassPlan,
    open_executor,
)
from .layers import LayerInfo, LayerPlan, plan_layers, trace
from .lock import LOCK_NAME, writer_lock
from .models import ModelSpec, build_model, describe_model
from .numerics import numerics_differences, numerics_key
from .progress import Progress, as_progress
from .report import LayerStats, format_table, with_unsolved
from .solve import (
    Refinement,
    Residual,
    Solution,
    follower_solution,
    orthogonal_,
    predict,
    refresh_weight_norm_,
    rescale_,
    residual,
    solve,
)
from .store import RunStore, layer_key, versions

__all__ = ["RunResult", "compute", "open_split", "resolve_device"]


@dataclass
class RunResult:
    """What :func:`compute` did.

    Attributes:
        path: The run store.
        model: The model, now initialized.
        config: The configuration it ran.
        layers: Per-layer statistics, in forward order, the layers left as they are (with
            their reason) included.
        passes: Passes over the solve split this call ran, verification excluded.
        seconds: Wall time of this call's solve (passes and writes), verification excluded.
        up_to_date: The store was already complete for this config and data.
        resumed: The store held an unfinished run that this call continued.
        off_target: Solved layers whose verified statistics miss ``config.tol`` on the
            solve split (``compute`` raises :class:`~.errors.OffTarget` when any do).
    """

    path: Path
    model: nn.Module
    config: RunConfig
    layers: list[LayerStats] = field(default_factory=list)
    passes: int = 0
    seconds: float = 0.0
    up_to_date: bool = False
    resumed: bool = False
    off_target: list[str] = field(default_factory=list)

    @property
    def solved(self) -> list[LayerStats]:
        """The layers the run solved (``layers`` without those it left)."""
        return [s for s in self.layers if not s.reason]

    def table(self) -> str:
        """The per-layer table: mean/std before, after on each measured split."""
        splits = [self.config.split] + ([self.config.holdout] if self.config.holdout else [])
        return format_table(
            self.layers,
            splits=splits,
            solve_split=self.config.split,
            target_std=self.config.target_std,
            tol=self.config.tol,
            mode=self.config.mode,
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


def open_split(
    config: RunConfig,
    split: str,
    *,
    root: Path,
    download: bool = True,
    data=None,
    collate=None,
) -> Source:
    """Open one split of the run's data: ``config.dataset`` under ``root``, or ``data``.

    ``data`` is a user's own data (see :func:`~lsuv_pipeline.data.source_from`), labelled
    ``config.dataset``; ``config.limit`` applies to both.
    """
    if data is not None:
        return limited(source_from(data, name=config.dataset, split=split, collate=collate),
                       config.limit)  # fmt: skip
    spec = DatasetSpec(
        name=config.dataset,
        split=split,
        root=str(root.resolve()),  # workers may run elsewhere: they get an absolute path
        limit=config.limit,
        download=download,
        options=config.dataset_options,
    )
    return open_source(spec)


def _open_sources(
    config: RunConfig, root: Path, download: bool, data, holdout_data, collate
) -> tuple[Source, Source | None]:
    train = open_split(config, config.split, root=root, download=download, data=data,
                       collate=collate)  # fmt: skip
    holdout = None
    if config.verify and config.holdout is not None:
        if config.holdout == config.split:
            raise ConfigError(
                f"the held-out split must differ from the solve split {config.split!r}"
            )
        if data is None or holdout_data is not None:
            holdout = open_split(config, config.holdout, root=root, download=download,
                                 data=holdout_data, collate=collate)  # fmt: skip
    return train, holdout


class _StopFlag:
    """Set by the first Ctrl-C; the pass stops after the batch in flight."""

    def __init__(self) -> None:
        self.requested = False


@contextlib.contextmanager
def _stop_on_sigint() -> Iterator[_StopFlag]:
    """First SIGINT: stop after the current batch. Second: interrupt at once."""
    flag = _StopFlag()
    if threading.current_thread() is not threading.main_thread():
        yield flag
        return

    def handler(signum, frame):
        if flag.requested:
            raise KeyboardInterrupt
        flag.requested = True

    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield flag
    finally:
        signal.signal(signal.SIGINT, previous)


def recorded_config(config: RunConfig, *, model_given: bool) -> RunConfig:
    """The config as the store records it: for a model the caller gave, no model name,
    kwargs or seed (the tool built nothing), unless the seed drew the orthogonal pre-init."""
    if not model_given:
        return config
    return dataclasses.replace(
        config, model=None, model_kwargs={}, seed=config.seed if config.orthogonal else None
    )


#: Identity keys from the model's description, and what a difference in them means.
_MODEL_KEYS = {
    "model class": ("class", ""),
    "model structure": ("structure", " (other layers or layer settings)"),
    "model initial state": ("initial", " (other initial weights: another seed or init)"),
}


def _identity(config: RunConfig, train: Source, holdout: Source | None, model: dict) -> dict:
    """What a store must match to be resumed or to count as up to date."""
    return {
        "config": config.to_dict(),
        "dataset fingerprint": train.fingerprint,
        "held-out fingerprint": holdout.fingerprint if holdout is not None else None,
        **{key: model.get(field) for key, (field, _) in _MODEL_KEYS.items()},
        "provenance": model,
    }


def _stored_identity(attrs: dict) -> dict:
    holdout = attrs.get("holdout") or {}
    model = attrs.get("model", {})
    return {
        "config": attrs.get("config"),
        "dataset fingerprint": attrs.get("dataset", {}).get("fingerprint"),
        "held-out fingerprint": holdout.get("fingerprint"),
        **{key: model.get(field) for key, (field, _) in _MODEL_KEYS.items()},
    }


def _differences(stored: dict, wanted: dict) -> list[str]:
    out = []
    for key, want in wanted.items():
        have = stored.get(key)
        if key == "config" and isinstance(have, dict):
            with contextlib.suppress(LsuvError):  # fill keys a store predates with defaults
                have = RunConfig.from_dict(have).to_dict()
            out += [
                f"--{k.replace('_', '-')}: {have.get(k)!r} -> {v!r}"
                for k, v in want.items()
                if have.get(k) != v
            ]
        elif key == "provenance":
            continue  # recorded, not compared: the digests above say what matters
        elif have != want:
            why = _MODEL_KEYS.get(key, ("", ""))[1]
            out.append(f"{key}: {_short(have)} -> {_short(want)}{why}")
    return out


def _short(value):
    """A digest cut to a readable length; other values as they are."""
    if isinstance(value, str) and value.startswith("sha256:"):
        return value[:19]
    return value


def check_finite(source: Source, shard, moments: dict[str, tuple[mom.Moments, ...]]) -> None:
    """Stop at the first shard whose outputs are NaN or infinite, naming its samples.

    Raises:
        DataError: A layer's moments over the shard are not finite.
    """
    for name, calls in moments.items():
        if not all(bool(torch.isfinite(m.mean).all() and torch.isfinite(m.m2).all())
                   for m in calls):  # fmt: skip
            raise DataError(
                f"split {source.split!r} of {source.name!r}, samples {shard.start}.."
                f"{shard.stop - 1}: layer {name or '(model)'!r} gives NaN or infinite outputs "
                "(NaN or inf in those samples, or an overflow in an earlier layer)"
            )


class _Solver:
    """One run's state: model, data, store and executor, and the passes over them."""

    def __init__(
        self, config, model, train, store, executor, device, progress, stop, tf32, followers=()
    ):
        self.config = config
        self.followers = list(followers)
        self.allow_tf32 = tf32
        self.cache_token: str | None = None  # set when passes run from cached activations
        self.cache_budget: int | None = None
        self.model = model
        self.train = train
        self.store = store
        self.executor = executor
        self.device = device
        self.progress = progress
        self.stop = stop
        self.passes = 0
        self.current = ""
        self._layers: list[LayerInfo] = []
        #: Updates of the layers solved so far, in forward order. The model keeps its
        #: initial weights until the end; passes map solved layers' outputs instead.
        self.solutions: dict[str, Solution] = {}

    def mapped(self) -> dict[str, Solution]:
        """The output maps of a pass: each solved layer's update, and for a layer tied to a
        solved one (it shares the rescaled weight) the map that sharing implies."""
        out = dict(self.solutions)
        for f in self.followers:
            if f.leader in self.solutions:
                bias = self.model.get_submodule(f.name).bias
                out[f.name] = follower_solution(self.solutions[f.leader], bias, f.shares_bias)
        return out

    def _advance(self, n: int) -> None:
        self.progress.advance(n)
        if self.stop.requested:
            raise Interrupted(self.current)

    def measure(
        self,
        pass_id: str,
        layers: Sequence[LayerInfo],
        *,
        stop_after: LayerInfo | None,
        label: str,
        source: Source | None = None,
        solved: dict[str, Solution] | None = None,
        cache: CachePlan | None = None,
    ) -> dict[str, list[mom.Moments]]:
        """One pass: per layer, each call's moments over every shard, merged in shard order.

        ``solved`` maps layers to the updates their outputs go through during the pass.
        Shards already recorded for ``pass_id`` (by an earlier, interrupted run) are read
        back, not recomputed; each new shard is recorded as soon as it finishes.
        """
        source = source or self.train
        parts = source.shards(self.config.shard_size)
        keys = {info.name: layer_key(info.name) for info in layers}
        partial = self.store.partial(
            pass_id, len(parts), [(keys[i.name], i.calls, i.channels) for i in layers]
        )
        results = {
            index: {name: done[key] for name, key in keys.items()}
            for index, done in partial.done().items()
        }
        todo = [s for s in parts if s.index not in results]
        plan = PassPlan(
            tuple(layers),
            stop_after,
            self.config.batch_size,
            self.allow_tf32,
            tuple((solved or {}).items()),
            cache,
        )
        self.current = label
        self.progress.pass_started(label, source.count)
        if results:  # shards an interrupted run finished
            self.progress.advance(sum(len(s) for s in parts if s.index in results))
        try:
            for shard, moments in self.executor.run_pass(
                self.model, source, todo, plan, device=self.device, on_batch=self._advance
            ):
                check_finite(source, shard, moments)
                partial.put(shard.index, {keys[name]: m for name, m in moments.items()})
                results[shard.index] = moments
        finally:
            self.progress.pass_finished()
        return {
            info.name: [
                mom.merge_all(results[s.index][info.name][call] for s in parts)
                for call in range(info.calls)
            ]
            for info in layers
        }

    def layer_pass(
        self, k: int, info: LayerInfo, index: int, trial: Solution | None = None
    ) -> list[mom.Moments]:
        """Pass ``index`` (1-based) of layer ``k``: its per-call output moments.

        Earlier layers' outputs go through their updates; ``trial`` is the update of layer
        ``k`` itself being refined (passes after the first of an iterated layer).

        The passes of an iterated layer are recorded, so a resumed run replays its
        refinement from them instead of measuring again.
        """
        key = layer_key(info.name)
        if info.dependent:
            recorded = self.store.read_pass(key, index)
            if recorded is not None:
                return list(recorded)
        label = f"[{k + 1}/{len(self._layers)}] {info.name}"
        if index > 1:
            label += f" (pass {index})"
        solved = self.mapped()
        if trial is not None:
            solved[info.name] = trial
        cache = None
        if self.cache_token is not None:
            cache = CachePlan(self.cache_token, tuple(self._layers), k, self.cache_budget)
        calls = self.measure(
            f"layer/{key}/{index}",
            [info],
            stop_after=info,
            label=label,
            solved=solved,
            cache=cache,
        )
        self.passes += 1
        if info.dependent:
            self.store.write_pass(key, index, tuple(calls[info.name]))
        return calls[info.name]

    def solve_layer(self, k: int, info: LayerInfo) -> LayerStats:
        """Measure and solve one layer (iterating when its calls feed each other)."""
        config = self.config
        module = self.model.get_submodule(info.name)
        has_bias = getattr(module, "bias", None) is not None
        calls = self.layer_pass(k, info, 1)
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
        passes = 1
        res = residual(
            predict(before, solution),
            mode=config.mode,
            target_std=config.target_std,
            has_bias=has_bias,
        )
        converged = True
        if info.dependent:
            solution, res, passes = self._refine(k, info, before, solution, has_bias)
            converged = res.within(config.tol)
            if not converged:
                self.progress.note(
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
        }
        self.store.commit_layer(layer_key(info.name), before, solution, attrs)
        self.solutions[info.name] = solution
        return LayerStats(
            name=info.name, kind=info.kind, passes=passes, converged=converged, has_bias=has_bias
        )

    def _refine(self, k, info, before, solution, has_bias):
        """Repeat a layer's pass with accelerated steps until its pooled output is on target."""
        config = self.config
        refinement = Refinement(
            solution, before, mode=config.mode, target_std=config.target_std, has_bias=has_bias
        )
        passes = 1
        res = Residual(mean=float("inf"), std=float("inf"), has_bias=has_bias)
        while passes < config.max_iter:
            passes += 1
            measured = mom.merge_all(self.layer_pass(k, info, passes, trial=solution))
            res = residual(
                measured, mode=config.mode, target_std=config.target_std, has_bias=has_bias
            )
            self.progress.note(
                f"{info.name}: calls feed each other; pass {passes}: |mean| {res.mean:.2e}, "
                f"|std - target| {res.std:.2e}"
            )
            if res.within(config.tol) or passes >= config.max_iter:
                break
            solution = refinement.step(measured)
        return solution, res, passes

    def run(self, layers: list[LayerInfo]) -> list[LayerStats]:
        """Solve every layer in order (committed layers are read back from the store), then
        give the model its final weights."""
        self._layers = layers
        stats = []
        for k, info in enumerate(layers):
            key = layer_key(info.name)
            if self.store.committed(key):
                record = self.store.read_layer(key)
                self.solutions[info.name] = record.solution
                a = record.attrs
                stats.append(
                    LayerStats(
                        name=info.name,
                        kind=info.kind,
                        passes=a["passes"],
                        converged=a["converged"],
                        has_bias=a["has_bias"],
                    )
                )
                continue
            stats.append(self.solve_layer(k, info))
        for name, solution in self.solutions.items():
            rescale_(self.model.get_submodule(name), solution)
        return stats


def keeps_callers_rng(fn):
    """Run ``fn`` leaving the global torch (CPU, and CUDA where initialized), NumPy and
    Python RNG states exactly as it found them.

    Each iteration of a ``DataLoader`` draws its base seed from the global torch RNG, so a
    pass over a caller's loader would otherwise make a training script train differently
    depending on whether the store already existed.
    """

    @functools.wraps(fn)
    def wrapped(*args, **kwargs):
        import random

        import numpy as np

        python, numpy_state = random.getstate(), np.random.get_state()
        cuda = list(range(torch.cuda.device_count())) if torch.cuda.is_initialized() else []
        try:
            with torch.random.fork_rng(devices=cuda):
                return fn(*args, **kwargs)
        finally:
            random.setstate(python)
            np.random.set_state(numpy_state)

    return wrapped


@keeps_callers_rng
def compute(
    config: RunConfig,
    out: str | Path,
    *,
    model: nn.Module | None = None,
    data=None,
    holdout_data=None,
    collate=None,
    data_root: str | Path | None = None,
    download: bool = True,
    device: str | torch.device | None = "auto",
    workers: int | None = None,
    scheduler: str | None = None,
    scheduler_file: str | None = None,
    scheduler_timeout: float = 20.0,
    executor: Executor | None = None,
    allow_tf32: bool = False,
    cache: bool = True,
    cache_memory: int | str | None = None,
    progress: Progress | bool = False,
    overwrite: bool = False,
    allow_mixed_hardware: bool = False,
) -> RunResult:
    """Compute the full-dataset LSUV init of a model and write it to a run store.

    Rerunning the same call continues an interrupted run from its store, or, if the store
    is complete with the same config and data, does no pass at all.

    Args:
        config: What to compute.
        out: Path of the run store (a Zarr group).
        model: A model to initialize in place; by default ``config.model`` is built with
            ``config.seed``.
        data: Your own training data instead of ``config.dataset``: a map-style
            ``torch.utils.data.Dataset`` (items ``x`` or ``(x, y)``) or a sized, re-iterable
            collection of batches (a ``DataLoader`` without shuffling, a list of tensors);
            ``config.dataset`` becomes its label. See ``data.source_from``.
        holdout_data: Your own held-out data, measured after the solve.
        collate: How items (a Dataset) or batches (a collection) become one float tensor.
        data_root: Folder with the datasets (default ``$LSUV_DATA_ROOT``, else ``data/``).
        download: Download a missing dataset.
        device: ``"auto"`` (CUDA if available), ``"cpu"``, ``"cuda"``, ``"cuda:1"``, ...
            On a dask cluster, the device type each worker uses.
        workers: Start a local dask cluster of this many worker processes for the run.
        scheduler: Use the dask cluster of this scheduler address (left running).
        scheduler_file: Use the dask cluster of this scheduler file (left running).
        scheduler_timeout: Seconds to wait for an existing scheduler and its first worker.
        executor: An executor of your own (overrides the three above); default inline.
        allow_tf32: Let CUDA use TF32 in the passes (faster; results then differ by GPU).
        cache: Keep activations between passes so each pass computes only the new layer
            (same results; see ``cache.py``). Off, or for a model torch.fx cannot trace,
            every pass runs from the input with early exit.
        cache_memory: Budget of the activation cache per process, in bytes or as
            ``"4GB"``; default half the memory free on the device.
        progress: ``True`` for progress bars on stderr, or a :class:`Progress`.
        overwrite: Replace an existing store of another config or dataset.
        allow_mixed_hardware: Let passes run where the numerics fingerprint differs from
            the run's (dask workers of other hardware, or resuming a run started
            elsewhere); the store records every fingerprint that computed, and its bytes
            then depend on who computed what.

    Returns:
        A :class:`RunResult` with the initialized model and its per-layer statistics.

    Raises:
        LsuvError: Bad configuration, data, model or store, or a layer that cannot be solved.
        Interrupted: Ctrl-C; the store keeps everything finished so far.
    """
    progress = as_progress(progress)
    dev = resolve_device(device)
    try:
        budget = parse_size(cache_memory)
    except ValueError as exc:
        raise ConfigError(f"--cache-memory: {exc}") from None
    given = model is not None
    if given:
        described = describe_model(model)  # a ModelError for what is not a module
    elif config.model is None:
        raise ConfigError("no model: give RunConfig(model=...) or compute(..., model=...)")
    config = recorded_config(config, model_given=given)
    root = resolve_root(data_root) if data is None else Path(".")
    train, holdout = _open_sources(config, root, download, data, holdout_data, collate)
    out = Path(out)
    exists = RunStore.check_out(out)
    if not given:
        model = build_model(
            ModelSpec(name=config.model, kwargs=config.model_kwargs),
            seed=config.seed,
            in_channels=train.sample_shape[0],
            num_classes=train.num_classes or 10,
        )
        described = describe_model(model)
    provenance = (
        {**described, "source": "caller"}
        if given
        else {**described, "source": "built", "name": config.model,
              "kwargs": dict(config.model_kwargs), "seed": config.seed}
    )  # fmt: skip
    identity = _identity(config, train, holdout, provenance)
    executors = (
        contextlib.nullcontext(executor)
        if executor is not None
        else open_executor(
            workers=workers,
            scheduler=scheduler,
            scheduler_file=scheduler_file,
            device_type=dev.type,
            timeout=scheduler_timeout,
            allow_mixed=allow_mixed_hardware,
        )
    )
    try:
        with writer_lock(out) as stale, _stop_on_sigint() as stop, executors as ex:
            if isinstance(ex, DaskExecutor):
                progress.note(f"{ex.description}; dashboard: {ex.dashboard}")
            if stale:
                progress.note(
                    f"took over the lock of a writer that is gone (pid {stale.get('pid')})"
                )
            store = _existing(out, identity, overwrite) if exists else None
            if store is not None and store.attrs.get("status") == "complete":
                return _up_to_date(store, model, config, dev)
            execution = _Execution(
                dev, ex, progress, stop, allow_tf32, cache, budget, allow_mixed_hardware
            )
            return _solve(config, out, model, store, train, holdout, identity, execution)
    except ReadOnlyStore:
        # nothing can write here, so nothing is writing: a complete store of this very run
        # is up to date without the lock; anything else needs a writable store
        if exists:
            store = RunStore.open(out)
            complete = store.attrs.get("status") == "complete"
            if complete and not _differences(_stored_identity(store.attrs), identity):
                return _up_to_date(store, model, config, dev)
        raise


def _existing(out: Path, identity: dict, overwrite: bool) -> RunStore | None:
    """Open the run store at ``out`` to resume it or find it up to date; ``None`` when it
    was of another run (or damaged) and ``overwrite`` cleared it."""
    try:
        store = RunStore.open(out, write=True)
    except ReadOnlyStore:
        raise
    except StoreError as exc:
        if not overwrite:
            raise StoreError(f"{exc}; pass --overwrite to replace it") from None
        RunStore.wipe(out, keep=(LOCK_NAME,))
        return None
    differ = _differences(_stored_identity(store.attrs), identity)
    if differ and not overwrite:
        raise StoreError(
            f"{str(out)!r} holds a run of another configuration or dataset "
            f"({'; '.join(differ)}); pass --overwrite to replace it, or choose another --out"
        )
    if differ:
        RunStore.wipe(out, keep=(LOCK_NAME,))
        return None
    return store


def _listing(plan: LayerPlan) -> str:
    """The layers a run will solve, in forward order, and those it leaves, as one note."""
    names = [i.name or "(model)" for i in plan.layers]
    shown = ", ".join(names) if len(names) <= 30 else ", ".join(names[:30]) + ", ..."
    text = f"solving {len(names)} layer(s) in forward order: {shown}"
    left = [u for u in plan.unsolved if u.reason != "left out by --include / --exclude"]
    options = len(plan.unsolved) - len(left)
    if options:
        text += f" ({options} left out by --include / --exclude)"
    for u in left[:30]:
        text += f"\nnot solving {u.name or '(model)'!r} ({u.kind}): {u.reason}"
    if len(left) > 30:
        text += f"\n... and {len(left) - 30} more not solved (listed in the store)"
    return text


def _up_to_date(store: RunStore, model: nn.Module, config: RunConfig, dev) -> RunResult:
    from .checkpoint import load_init

    load_init(model.to(dev), store.path, allow_off_target=True)
    result = RunResult(store.path, model, config, store.layer_stats(), up_to_date=True)
    return _checked(result, store.attrs)


@dataclass
class _Execution:
    """How a run executes (none of it changes the results)."""

    device: torch.device
    executor: Executor
    progress: Progress
    stop: _StopFlag
    allow_tf32: bool
    cache: bool
    cache_budget: int | None
    allow_mixed: bool = False


def _solve(config, out, model, store, train, holdout, identity, ex: _Execution):
    dev, progress = ex.device, ex.progress
    model.to(dev)
    traced = trace(model, train.batch(0, min(2, train.count)).to(dev))
    plan = plan_layers(
        model, traced, include=config.include, exclude=config.exclude, mode=config.mode
    )
    layers = plan.layers
    progress.note(_listing(plan))
    resumed = store is not None
    numerics = ex.executor.numerics(dev)
    if store is None:
        if config.orthogonal:
            generator = torch.Generator(device=dev).manual_seed(config.seed)
            orthogonal_([model.get_submodule(i.name) for i in layers], generator=generator)
        store = RunStore.create(
            out,
            {
                "config": identity["config"],
                "dataset": train.describe(),
                "holdout": holdout.describe() if holdout is not None else None,
                "model": identity["provenance"],
                "layers": [{**i.to_dict(), "key": layer_key(i.name)} for i in layers],
                "unsolved": [u.to_dict() for u in plan.unsolved],
                "tied": [dataclasses.asdict(f) for f in plan.followers],
                "status": "running",
                "device": dev.type,
                "allow_tf32": ex.allow_tf32,
                "numerics": {**numerics, "key": numerics_key(numerics)},
                "versions": versions(),
            },
        )
        store.write_state("initial", model.state_dict())
    else:
        stored = [d["name"] for d in store.attrs["layers"]]
        if stored != [i.name for i in layers]:
            raise StoreError(
                f"{str(out)!r} was started for layers {stored}, this model has "
                f"{[i.name for i in layers]}; pass --overwrite to start again"
            )
        from .checkpoint import _check_against

        initial = store.read_state("initial")
        _check_against(model, initial, repr(str(out)), strict=True)
        model.load_state_dict(initial)
        _resume_numerics(store, numerics, ex.allow_mixed)
        progress.note(f"resuming {out}")
    initial = {k: v.detach().clone() for k, v in model.state_dict().items()}

    solver = _Solver(
        config,
        model,
        train,
        store,
        ex.executor,
        dev,
        progress,
        ex.stop,
        ex.allow_tf32,
        plan.followers,
    )
    if ex.cache and plan.followers:
        tie = plan.followers[0]
        progress.note(
            f"activation cache off: {tie.name!r} shares its weight with {tie.leader!r} "
            "(tied); each pass runs from the input"
        )
    elif ex.cache:
        try:
            Segments(model, layers)
            solver.cache_token = f"{uuid.uuid4().hex}-{dev}"
            solver.cache_budget = ex.cache_budget
        except Uncacheable as why:
            progress.note(f"activation cache off: {why}; each pass runs from the input")
    started = time.perf_counter()
    try:
        stats = solver.run(layers)
        final = {k: v.detach().clone() for k, v in model.state_dict().items()}
        store.write_state("final", final)
        seconds = time.perf_counter() - started
        if config.verify:
            stats = _verify(solver, layers, stats, initial, final, holdout)
            off = [
                st.name
                for st in stats
                if st.on_target(
                    config.split, mode=config.mode, target_std=config.target_std, tol=config.tol
                )
                is False
            ]
            store.update_attrs(
                {"verification": {"split": config.split, "tol": config.tol, "off_target": off}}
            )
    except Interrupted:
        done = sum(store.committed(layer_key(i.name)) for i in layers)
        raise Interrupted(
            f"interrupted during {solver.current!r} with {done} of {len(layers)} layers "
            f"solved; finished shards are kept in {str(out)!r}: rerun the same command to resume"
        ) from None
    _record_mixed(store, ex.executor.mixed, progress)
    for module in model.modules():  # passes ran in inference mode: no inference weights left
        refresh_weight_norm_(module)
    store.finish()
    result = RunResult(
        out, model, config, with_unsolved(stats, plan.unsolved), solver.passes, seconds,
        resumed=resumed,
    )  # fmt: skip
    return _checked(result, store.attrs)


def _checked(result: RunResult, attrs: dict) -> RunResult:
    """Raise :class:`OffTarget` when the store's verification found layers off target."""
    record = attrs.get("verification") or {}
    result.off_target = list(record.get("off_target") or [])
    if result.off_target:
        raise OffTarget(
            f"{len(result.off_target)} solved layer(s) miss the tolerance {record.get('tol'):g} "
            f"on {record.get('split')!r} after LSUV: {', '.join(result.off_target)} (see the "
            f"table; the store {str(result.path)!r} records it)",
            result,
        )
    return result


def _resume_numerics(store: RunStore, numerics: dict, allow_mixed: bool) -> None:
    """Refuse to finish a run here if it was started with other numerics, unless allowed."""
    stored = store.attrs.get("numerics") or {}
    if stored.get("key") == numerics_key(numerics):
        return
    if not allow_mixed:
        differ = "; ".join(numerics_differences(stored, numerics)) or (
            "its recorded key differs" if stored else "none recorded"
        )
        raise StoreError(
            f"{str(store.path)!r} was started with other numerics than this machine has "
            f"({differ}); finishing it here would mix them: rerun where it started, pass "
            "--overwrite to start again here, or --allow-mixed-hardware to finish it here "
            "(recorded in the store)"
        )
    _record_mixed(store, [numerics], None)


def _record_mixed(store: RunStore, others: list[dict], progress: Progress | None) -> None:
    """Add fingerprints that computed part of the run to its ``numerics`` record."""
    record = dict(store.attrs.get("numerics") or {})
    known = {numerics_key(fp) for fp in record.get("mixed", [])} | {record.get("key")}
    new = [fp for fp in others if numerics_key(fp) not in known]
    if not new:
        return
    record["mixed"] = [*record.get("mixed", []), *new]
    store.update_attrs({"numerics": record})
    if progress is not None:
        progress.note(
            f"note: {len(new)} other numerics fingerprint(s) computed shards of this run "
            "(--allow-mixed-hardware); recorded in the store, whose bytes now depend on "
            "which worker ran which shard"
        )


def _verify(solver, layers, stats, initial, final, holdout) -> list[LayerStats]:
    """Measure every layer after LSUV on each split, and before it (initial weights)."""
    config, store = solver.config, solver.store
    keys = [layer_key(i.name) for i in layers]

    def section(name: str, label: str, source: Source | None = None) -> dict[str, mom.Moments]:
        if store.section_complete(name, keys):
            return {i.name: store.read_moments(name, layer_key(i.name)) for i in layers}
        calls = solver.measure(name, layers, stop_after=None, label=label, source=source)
        pooled = {n: mom.merge_all(c) for n, c in calls.items()}
        for info in layers:
            store.write_moments(name, layer_key(info.name), pooled[info.name])
        return pooled

    measured = {config.split: section(f"verify/{config.split}", f"verify {config.split}")}
    if holdout is not None:
        measured[holdout.split] = section(
            f"verify/{holdout.split}", f"verify {holdout.split}", holdout
        )
    solver.model.load_state_dict(initial)
    try:
        before = section(f"before/{config.split}", f"initial {config.split}")
    finally:
        solver.model.load_state_dict(final)
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
