"""Verification of a finished run: every layer's output statistics over a split, measured
from scratch with the stored final weights."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from . import moments as mom
from .config import RunConfig
from .data import resolve_root
from .errors import ConfigError, ModelError
from .executors import Executor, InlineExecutor, PassPlan
from .models import ModelSpec, build_model, describe_model
from .progress import Progress, as_progress
from .report import LayerStats, format_table
from .run import check_finite, keeps_callers_rng, open_split, resolve_device
from .solve import refresh_weight_norm_

__all__ = ["Verification", "verify"]


@dataclass
class Verification:
    """The result of :func:`verify`: every layer's output statistics on one split.

    Attributes:
        split: The split measured.
        layers: Per-layer statistics (``after[split]`` holds the measurement).
        failures: Layers whose |mean| (layers with bias) or |std - target| exceeds the tolerance.
    """

    split: str
    config: RunConfig
    tol: float
    layers: list[LayerStats]
    failures: list[str]

    @property
    def ok(self) -> bool:
        return not self.failures

    def table(self) -> str:
        return format_table(
            self.layers,
            splits=[self.split],
            solve_split=self.split,
            target_std=self.config.target_std,
            tol=self.tol,
            mode=self.config.mode,
        )


@keeps_callers_rng
def verify(
    source: str | Path,
    *,
    split: str = "train",
    tol: float = 1e-4,
    model: nn.Module | None = None,
    data=None,
    collate=None,
    data_root: str | Path | None = None,
    download: bool = True,
    device: str | torch.device | None = "auto",
    executor: Executor | None = None,
    progress: Progress | bool = False,
) -> Verification:
    """Measure every layer of a finished run's final weights over a split, from scratch.

    Args:
        source: A run store path or a shipped checkpoint's name.
        split: The split to measure (``"train"``, ``"test"``).
        tol: Tolerance on |mean| and |std - target| per layer.
        model: The model to load the weights into (default: built from the run's config).
        data: The split's samples, for a run computed on your own data (see ``compute``).
        collate, data_root, download, device, executor, progress: As for ``compute``.

    Returns:
        A :class:`Verification`; ``ok`` is false when some layer misses ``tol``.
    """
    from .checkpoint import load_init, open_run

    if not (tol > 0):
        raise ConfigError(f"--tol must be a positive number, got {tol}")
    progress = as_progress(progress)
    run = open_run(source)
    run.check()  # every array's checksum first: damage anywhere is found, not only here
    config = run.config
    dev = resolve_device(device)
    root = resolve_root(data_root) if data is None else Path(".")
    data = open_split(config, split, root=root, download=download, data=data, collate=collate)
    recorded = run.attrs.get("model") if isinstance(run.attrs.get("model"), dict) else {}
    if model is None and config.model is None:
        raise ConfigError(
            f"{str(run.path)!r}: its model ({recorded.get('class', '?')}) was given by the "
            "caller, so verify cannot build it: call verify(..., model=...) from Python with "
            "a model of the same architecture"
        )
    if model is not None:
        structure = describe_model(model)["structure"]
        if recorded.get("structure") not in (None, structure):
            raise ModelError(
                f"{type(model).__name__} does not have the structure of the run's model "
                f"({recorded.get('class', '?')}): other layers or layer settings"
            )
    else:
        model = build_model(
            ModelSpec(name=config.model, kwargs=config.model_kwargs),
            seed=config.seed,
            in_channels=data.sample_shape[0],
            num_classes=data.num_classes or 10,
        )
    load_init(model, run.path)
    model.to(dev)
    layers = run.layers
    executor = executor or InlineExecutor()
    plan = PassPlan(tuple(layers), None, config.batch_size)
    parts = data.shards(config.shard_size)
    results = {}
    progress.pass_started(f"verify {split}", data.count)
    try:
        for shard, moments in executor.run_pass(
            model, data, parts, plan, device=dev, on_batch=progress.advance
        ):
            check_finite(data, shard, moments)
            results[shard.index] = moments
    finally:
        progress.pass_finished()
    stats, failures = [], []
    recorded = {s.name: s for s in run.stats()}
    for info in layers:
        pooled = mom.merge_all(
            mom.merge_all(results[s.index][info.name][c] for s in parts) for c in range(info.calls)
        )
        r = recorded[info.name]
        row = LayerStats(
            name=info.name,
            kind=info.kind,
            passes=r.passes,
            converged=r.converged,
            has_bias=r.has_bias,
            before=r.before,
            after={split: pooled},
        )
        if not row.on_target(split, mode=config.mode, target_std=config.target_std, tol=tol):
            failures.append(info.name)
        stats.append(row)
    for module in model.modules():
        refresh_weight_norm_(module)
    return Verification(split, config, tol, stats, failures)
