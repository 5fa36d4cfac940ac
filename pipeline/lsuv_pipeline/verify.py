"""Verification of a finished run: check every array of its store, then measure every
layer's output statistics over a split, from scratch, with the stored final weights."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from . import moments as mom
from .checkpoint import load_init, open_run
from .config import DEFAULT_TOL, RunConfig
from .context import keeps_callers_rng, model_for, open_split, resolve_device
from .data import resolve_root
from .errors import ConfigError, ModelError
from .executors import Executor, InlineExecutor
from .models import describe_model, unwrap
from .passes import PassContext, run_pass
from .progress import Progress, as_progress
from .report import LayerStats, format_table
from .shard import PassPlan
from .solve import refresh_weight_norm_

__all__ = ["Verification", "verify"]


@dataclass
class Verification:
    """The result of :func:`verify`: every layer's output statistics on one split.

    Attributes:
        split: The split measured.
        tol: The tolerance the split was judged by, or ``None`` for a held-out split that
            was reported, not judged.
        layers: Per-layer statistics (``after[split]`` holds the measurement).
        failures: Layers off target within ``tol`` (``solve.residual``'s rule: std, and the
            mean of a layer with a bias, per channel in channel mode).
    """

    split: str
    config: RunConfig
    tol: float | None
    layers: list[LayerStats]
    failures: list[str]

    @property
    def ok(self) -> bool:
        return not self.failures

    @property
    def judged(self) -> dict[str, float]:
        """The split judged and its tolerance (empty for a split only reported)."""
        return {} if self.tol is None else {self.split: self.tol}

    def table(self) -> str:
        return format_table(
            self.layers,
            splits=[self.split],
            solve_split=self.split if self.tol is not None else "",
            target_std=self.config.target_std,
            tol=self.tol or 0.0,
            mode=self.config.mode,
        )


def _model(run, model: nn.Module | None, data) -> nn.Module:
    """The model to load the run's weights into: the caller's (of the run's structure), or
    the one the run's config names."""
    recorded = run.attrs.get("model") if isinstance(run.attrs.get("model"), dict) else {}
    if model is None and run.config.model is None:
        raise ConfigError(
            f"{str(run.path)!r}: its model ({recorded.get('class', '?')}) was given by the "
            "caller, so verify cannot build it: call verify(..., model=...) from Python with "
            "a model of the same architecture"
        )
    if model is not None:
        model = unwrap(model)  # a DataParallel / torch.compile wrapper: the run's plain names
        structure = describe_model(model)["structure"]
        if recorded.get("structure") not in (None, structure):
            raise ModelError(
                f"{type(model).__name__} does not have the structure of the run's model "
                f"({recorded.get('class', '?')}): other layers or layer settings"
            )
        return model
    return model_for(run.config, None, data)[0]


def _check_measurable(run, split: str) -> None:
    """Refuse, before any pass, a split that was read from data the caller gave."""
    for record in (run.attrs.get("dataset"), run.attrs.get("holdout")):
        if not isinstance(record, dict) or record.get("split") != split:
            continue
        user = (record.get("transform") or {}).get("user")
        if user:
            raise ConfigError(
                f"{str(run.path)!r}: its {split!r} split was given by the caller "
                f"({user.get('type', '?')}, labelled {record.get('name')!r}), so it cannot be "
                "read again by name; every array of the store checked intact. Re-measure it "
                "from Python: verify(path, split=..., data=<the same samples>)"
            )


@keeps_callers_rng
def verify(
    source: str | Path,
    *,
    split: str = "train",
    tol: float | None = None,
    holdout_tol: float | None = None,
    model: nn.Module | None = None,
    data=None,
    collate=None,
    forward_fn=None,
    mask_fn=None,
    data_root: str | Path | None = None,
    download: bool = True,
    device: str | torch.device | None = "auto",
    executor: Executor | None = None,
    progress: Progress | bool = False,
) -> Verification:
    """Check a finished run's store, then measure every layer of its final weights.

    Args:
        source: A run store path or a shipped checkpoint's name.
        split: The split to measure (``"train"``, ``"test"``).
        tol: Tolerance on |mean| and |std - target| per layer, on the split the run solved
            (default: the run's own, ``RunConfig.tol``, wider for a half-precision model).
        holdout_tol: The tolerance for any other split (held out); ``None``: measure and
            report it, judge nothing. A held-out split is near the target, not at it: by
            how much it differs from the solved one.
        model: The model to load the weights into (default: built from the run's config).
        data: The split's samples, for a run computed on your own data (see ``compute``).
        collate, forward_fn, mask_fn, data_root, download, device, executor, progress: As
            for ``compute``.

    Returns:
        A :class:`Verification`; ``ok`` is false when some layer misses its tolerance.

    Raises:
        StoreError: A damaged array anywhere in the store (every one is read first).
        ConfigError: A run made from data the caller gave, without ``data``.
    """
    for name, value in (("--tol", tol), ("--holdout-tol", holdout_tol)):
        if value is not None and not (value > 0):
            raise ConfigError(f"{name} must be a positive number, got {value}")
    run = open_run(source)
    run.check()  # every array's checksum first: damage anywhere is found, not only here
    config = run.config
    if data is None:
        _check_measurable(run, split)
    if split != config.split:
        tol = holdout_tol
    elif tol is None:  # the run's own (a store's config always records one)
        tol = config.tol or DEFAULT_TOL
    dev = resolve_device(device)
    root = resolve_root(data_root) if data is None else Path(".")
    data = open_split(config, split, root=root, download=download, data=data, collate=collate,
                      whole=forward_fn is not None)  # fmt: skip
    model = _model(run, model, data)
    load_init(model, run.path)
    model.to(dev)
    ctx = PassContext(executor or InlineExecutor(), model, dev, config.shard_size,
                      as_progress(progress))  # fmt: skip
    functional = any(i.functional for i in run.layers)
    plan = PassPlan(tuple(run.layers), None, config.batch_size, functional=functional,
                    forward=forward_fn, mask=mask_fn, compiled=config.compile)  # fmt: skip
    measured = run_pass(ctx, data, plan, label=f"verify {split}")
    recorded = {s.name: s for s in run.stats()}
    stats, failures = [], []
    for info in run.layers:
        r = recorded[info.name]
        row = LayerStats(name=info.name, kind=info.kind, passes=r.passes, converged=r.converged,
                         has_bias=r.has_bias, dead=r.dead, before=r.before,
                         after={split: mom.merge_all(measured[info.name])})  # fmt: skip
        on = tol is None or row.on_target(split, mode=config.mode,
                                          target_std=config.target_std, tol=tol)  # fmt: skip
        if not on:
            failures.append(info.name)
        stats.append(row)
    for module in model.modules():
        refresh_weight_norm_(module)
    return Verification(split, config, tol, stats, failures)
