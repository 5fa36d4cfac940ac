"""Reading finished runs: load an init into a model, inspect a run, export a state dict.

    from lsuv_pipeline import load_init, mj
    model = load_init(mj(), "mnist-mj")          # the shipped checkpoint, by name
    model = load_init(mj(), "runs/my-run.zarr")  # or any complete run store

A checkpoint is a run store whose status is ``"complete"``; its ``final/`` arrays are the
weights. Nothing is unpickled: the arrays are Zarr chunks checked against their sha256.
"""

from __future__ import annotations

import io
import os
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import torch
from torch import nn

from . import moments as mom
from .config import RunConfig
from .errors import StoreError, write_error
from .layers import LayerInfo, Unsolved
from .models import assign_state_, unwrap
from .page import write_report
from .report import (
    LayerStats,
    format_running,
    format_table,
    plot_running,
    plot_stats,
    run_title,
    with_unsolved,
)
from .running import EPSILONS, Running, samples_within
from .schema import Section
from .store import RunStore

__all__ = [
    "SHIPPED",
    "Run",
    "check_fits",
    "export",
    "export_bytes",
    "load_init",
    "open_run",
    "resolve_checkpoint",
    "run_stats",
]

#: Checkpoints that ship with the package, by name.
SHIPPED = ("mnist-mj",)


def _shipped_path(name: str) -> Path:
    """The shipped store ``name``: inside the installed package, else in the checkout."""
    packaged = resources.files("lsuv_pipeline") / "checkpoints" / f"{name}.zarr"
    if packaged.is_dir():
        return Path(str(packaged))
    return Path(__file__).resolve().parents[2] / "data" / f"{name}.zarr"


def resolve_checkpoint(source: str | os.PathLike) -> Path:
    """Return the store path of ``source``: a path, or the name of a shipped checkpoint."""
    path = Path(source)
    if path.exists() or str(source) not in SHIPPED:
        return path
    return _shipped_path(str(source))


@dataclass(frozen=True)
class Run:
    """Read access to a run store.

    Attributes:
        path: The store.
        config: What was computed.
        status: ``"running"`` or ``"complete"``.
        layers: Target layers in forward order.
        attrs: Every root attribute (dataset, model, versions, ...).
    """

    path: Path
    config: RunConfig
    status: str
    layers: list[LayerInfo]
    attrs: dict
    _store: RunStore

    def layer(self, name: str) -> dict:
        """One committed layer: ``before`` moments, ``scale``, ``shift`` and its attributes."""
        record = self._store.read_layer(name)
        return {
            "before": record.before,
            "scale": record.solution.scale,
            "shift": record.solution.shift,
            **record.attrs,
        }

    def layer_attrs(self, name: str) -> dict:
        """A committed layer's attributes (passes, residuals, ...); ``{}`` if not committed."""
        return self._store.layer_attrs(name)

    def moments(self, section: str, name: str) -> mom.Moments:
        """Per-channel moments of a layer, e.g. ``moments("verify/test", "conv1")``."""
        kind, _, split = section.partition("/")
        return self._store.read_moments(Section(kind, split), name)

    def state(self, kind: str = "final") -> dict[str, torch.Tensor]:
        """The ``"initial"`` or ``"final"`` state dict."""
        return self._store.read_state(kind)

    def check(self) -> None:
        """Read every array of the store and check it (see :meth:`RunStore.check`)."""
        self._store.check()

    def stats(self) -> list[LayerStats]:
        """Per-layer statistics as far as the run got."""
        return run_stats(self._store)

    @property
    def splits(self) -> list[str]:
        """The solved split, then the held-out one if the run has one."""
        return [s for s in (self.config.split, self.config.holdout) if s]

    def passes(self, name: str) -> list[mom.Moments]:
        """The output moments of each recorded pass of a layer solved in more than one pass
        (its calls pooled): pass 1 with the initial weights, pass k with the update of step
        k - 1. Empty for a layer solved in one step (only iterated layers' passes are kept).
        """
        out = []
        for index in range(1, int(self._store.layer_attrs(name).get("passes", 0)) + 1):
            calls = self._store.read_pass(name, index)
            if calls is None:
                break
            out.append(mom.merge_all(calls))
        return out

    def running(self) -> dict[str, Running | None]:
        """Each target layer's running estimate after every shard (``running.Running``),
        in forward order; ``None`` for a layer without one (not solved yet, or solved by a
        version that did not record them)."""
        return {info.name: self._store.read_running(info.name) for info in self.layers}

    def samples_needed(
        self, epsilons: Sequence[float] = EPSILONS
    ) -> dict[str, dict[float, int | None]]:
        """Per layer with a running estimate, the samples after which it stayed within each
        ``eps`` of the full split's (``running.samples_within``; ``None``: only the whole
        split is).

        Raises:
            StoreError: No layer has a running estimate (a store written before they were
                recorded).
        """
        curves = self._recorded()
        return {n: {eps: samples_within(c, eps) for eps in epsilons} for n, c in curves.items()}

    def _recorded(self) -> dict[str, Running]:
        curves = {n: c for n, c in self.running().items() if c is not None}
        if not curves:
            raise StoreError(
                f"{str(self.path)!r} has no running estimates (its layers were solved by a "
                "version that did not record them); recompute it with --overwrite for them"
            )
        return curves

    def running_table(self, epsilons: Sequence[float] = EPSILONS) -> str:
        """Per layer, the samples its running estimate needed (``report.format_running``).

        Raises:
            StoreError: No layer has a running estimate.
        """
        self._recorded()
        return format_running(self.running(), epsilons=epsilons)

    def plot_running(self, path: str | os.PathLike, epsilons: Sequence[float] = EPSILONS) -> Path:
        """Draw each layer's running-estimate deviation by samples seen; return the path.

        Raises:
            StoreError: No layer has a running estimate, or the folder of ``path`` does
                not exist.
            ConfigError: An extension other than ``.png``, ``.svg``, ``.pdf``.
        """
        curves = self._recorded()
        return plot_running(curves, path, epsilons=epsilons, title=run_title(self.attrs))

    def plot(self, path: str | os.PathLike) -> Path:
        """Draw per-layer std, mean and residuals before and after LSUV; return the path.

        The format follows the extension (``.png``, ``.svg``, ``.pdf``); the title names
        the model, dataset and sample counts (see :func:`report.plot_stats`).

        Raises:
            ConfigError: Another extension.
            StoreError: The folder of ``path`` does not exist (none is created).
        """
        return plot_stats(
            self.stats(),
            path,
            splits=self.splits,
            solve_split=self.config.split,
            target_std=self.config.target_std,
            tol=self.config.tol,
            mode=self.config.mode,
            title=run_title(self.attrs),
        )

    def report(self, folder: str | os.PathLike) -> Path:
        """Write the run's report page, ``folder/index.html``; return its path.

        One self-contained HTML file (plots inline as SVG, no external reference, so it
        renders offline): provenance, status and verdict, the per-layer table, the plot,
        and the convergence of layers solved in more than one pass. One folder holds one
        run's page; a second report into it replaces the page. The folder is created when
        its parent exists; the page is written whole or not at all, with the mode a new
        file gets (0o666 less the umask).

        Raises:
            StoreError: The folder's parent does not exist, or it cannot be written.
        """
        return write_report(self, folder)

    def table(self) -> str:
        """The per-layer table, as ``compute`` prints it."""
        return format_table(
            self.stats(),
            splits=self.splits,
            solve_split=self.config.split,
            target_std=self.config.target_std,
            tol=self.config.tol,
            mode=self.config.mode,
        )


def run_stats(store: RunStore) -> list[LayerStats]:
    """Per-layer statistics of a store as far as its run got, for tables and plots: every
    solved layer's moments before and after LSUV, and the layers it left, in forward order."""
    attrs = store.attrs
    config = attrs.get("config", {})
    split, holdout = config.get("split", "train"), config.get("holdout")
    out = []
    for info in attrs.get("layers", []):
        name = info["name"]
        la = store.layer_attrs(name)
        section = Section("before", split)
        before = (
            store.read_moments(section, name) if store.section_complete(section, [name]) else None
        )
        after = {
            sp: store.read_moments(Section("verify", sp), name)
            for sp in (split, holdout)
            if sp and store.section_complete(Section("verify", sp), [name])
        }
        out.append(
            LayerStats(
                name=name,
                kind=info["kind"],
                passes=la.get("passes", 0),
                converged=la.get("converged", False),
                has_bias=la.get("has_bias", True),
                solved=bool(la),
                dead=len(la.get("dead_channels", [])),
                before=before,
                after=after,
            )
        )
    return with_unsolved(out, [Unsolved.from_dict(d) for d in attrs.get("unsolved", [])])


def open_run(path: str | os.PathLike) -> Run:
    """Open a run store (a path or a shipped checkpoint's name) for reading.

    Raises:
        StoreError: Not a run store, another schema, or damaged metadata.
    """
    store = RunStore.open(resolve_checkpoint(path))
    store.check_consistency()
    attrs = store.attrs
    try:
        config = RunConfig.from_dict(attrs["config"])
        layers = [
            LayerInfo.from_dict({k: v for k, v in d.items() if k != "key"}) for d in attrs["layers"]
        ]
        status = attrs["status"]
    except (KeyError, TypeError, ValueError) as exc:
        raise StoreError(f"{str(store.path)!r}: run attributes are damaged ({exc})") from None
    return Run(store.path, config, status, layers, attrs, store)


def check_fits(model: nn.Module, state: dict[str, torch.Tensor], where: str, strict: bool):
    """Check a stored state dict fits ``model``: names (``strict``), shapes and dtypes.

    Raises:
        StoreError: Naming every name, shape or dtype that does not fit.
    """
    own = model.state_dict()
    problems = []
    if strict:
        missing = [k for k in own if k not in state]
        unexpected = [k for k in state if k not in own]
        if missing:
            problems.append(f"missing from the store: {', '.join(missing[:5])}")
        if unexpected:
            problems.append(f"not in the model: {', '.join(unexpected[:5])}")
    for name, value in state.items():
        if name not in own:
            continue
        mine = own[name]
        if tuple(mine.shape) != tuple(value.shape):
            problems.append(
                f"{name}: shape {tuple(value.shape)} in the store, {tuple(mine.shape)} in the model"
            )
        elif mine.dtype != value.dtype:
            problems.append(f"{name}: dtype {value.dtype} in the store, {mine.dtype} in the model")
    if problems:
        raise StoreError(f"{where} does not fit {type(model).__name__}: " + "; ".join(problems))


def load_init(
    model: nn.Module,
    source: str | os.PathLike,
    *,
    strict: bool = True,
    allow_off_target: bool = False,
) -> nn.Module:
    """Load the LSUV init of a finished run into ``model``, all or nothing.

    Every name, shape and dtype is checked, and every array read and verified, before the
    model is changed; on any error the model is left as it was.

    Args:
        model: The model to initialize (in place); a ``DataParallel`` /
            ``DistributedDataParallel`` or ``torch.compile`` wrapper loads into the module
            it wraps, whose names the store has (see ``models.unwrap``).
        source: A run store path, or a shipped checkpoint's name (see :data:`SHIPPED`).
        strict: Require exactly the same parameter and buffer names (like
            :meth:`torch.nn.Module.load_state_dict`); else load the names both have.
        allow_off_target: Load a run whose verification found layers off target too.

    Returns:
        ``model`` (the wrapper, when it is one).

    Raises:
        StoreError: Missing, damaged or incomplete store, one whose verification failed
            (unless ``allow_off_target``), or one that does not fit the model.
    """
    if not isinstance(model, nn.Module):
        raise StoreError(f"load_init needs a torch.nn.Module, got {type(model).__name__}")
    path = resolve_checkpoint(source)
    store = RunStore.open(path)
    status = store.attrs.get("status")
    if status != "complete":
        raise StoreError(
            f"{str(path)!r} is not complete (status {status!r}); finish it by rerunning its "
            "compute command"
        )
    off = (store.attrs.get("verification") or {}).get("off_target") or []
    if off and not allow_off_target:
        raise StoreError(
            f"{str(path)!r}: its verification found {len(off)} layer(s) off target "
            f"({', '.join(off)}); pass allow_off_target=True to load it anyway"
        )
    store.check_consistency()
    state = store.read_state("final")
    check_fits(unwrap(model), state, repr(str(path)), strict)
    assign_state_(unwrap(model), state)
    return model


def _final_state(source: str | os.PathLike) -> dict[str, torch.Tensor]:
    path = resolve_checkpoint(source)
    store = RunStore.open(path)
    if store.attrs.get("status") != "complete":
        raise StoreError(f"{str(path)!r} is not complete; nothing to export")
    store.check_consistency()
    return store.read_state("final")


def export_bytes(source: str | os.PathLike) -> bytes:
    """A finished run's final state dict as the bytes ``torch.save`` writes to a stream."""
    buffer = io.BytesIO()
    torch.save(_final_state(source), buffer)
    return buffer.getvalue()


def export(source: str | os.PathLike, out: str | os.PathLike) -> Path:
    """Write a finished run's final state dict to ``out`` for ``torch.load(weights_only=True)``.

    The file is what ``torch.save(state, out)`` writes, with the mode a new file gets
    (0o666 less the umask). It is written in a temporary folder beside ``out`` and renamed
    into place, so ``out`` is never partial. ``out``'s folder must exist.

    Raises:
        StoreError: An incomplete or damaged run, a missing folder, or a failed write.
    """
    state = _final_state(source)
    out = Path(out)
    if not out.parent.is_dir():
        what = "is not a folder" if out.parent.exists() else "does not exist"
        raise StoreError(f"cannot write {str(out)!r}: its folder {str(out.parent)!r} {what}")
    try:
        with tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{out.name}.") as tmp:
            file = Path(tmp) / out.name
            torch.save(state, file)  # a new file: mode 0o666 less the umask
            os.replace(file, out)
    except OSError as exc:
        raise write_error(out, "the exported weights", exc) from None
    return out
