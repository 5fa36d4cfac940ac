"""Tables, plots and report files of per-layer statistics. Shows what others measured and
computes nothing of its own but pooling measured moments and ``solve.residual``'s rule."""

from __future__ import annotations

import os
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from . import figures
from . import moments as mom
from .errors import ConfigError, StoreError, write_error
from .running import EPSILONS, Running, samples_within
from .solve import Mode, residual

__all__ = [
    "FLAGS",
    "LayerStats",
    "Table",
    "check_output",
    "format_running",
    "format_table",
    "plot_running",
    "plot_stats",
    "row_flags",
    "row_notes",
    "run_title",
    "table_rows",
    "with_unsolved",
    "write_atomic",
]

#: Kinds of flag a layer's row can carry, most severe first (see :func:`table_rows`).
FLAGS = ("not solved", "off target", "not converged", "no bias", "dead channels")


@dataclass(frozen=True, kw_only=True)
class LayerStats:
    """What a run knows about one layer.

    Attributes:
        name: Module name.
        kind: Module class name.
        passes: Passes its solve took.
        converged: Whether it reached the tolerance.
        has_bias: Whether it could absorb its mean.
        solved: Whether its solve is committed (a run in progress has unsolved layers).
        before: Output moments with the initial weights (training split).
        after: Output moments after LSUV, per split name.
        reason: Why the run leaves it as it is (empty for a layer the run solves).
        dead: How many of its output channels are constant over the solve split.
    """

    name: str
    kind: str
    passes: int
    converged: bool
    has_bias: bool = True
    solved: bool = True
    before: mom.Moments | None = None
    after: dict[str, mom.Moments] = field(default_factory=dict)
    reason: str = ""
    dead: int = 0

    def on_target(self, split: str, *, mode: Mode, target_std: float, tol: float) -> bool | None:
        """Whether its output on ``split`` is on target (``solve.residual``'s rule), or
        ``None`` when it was not measured there."""
        m = self.after.get(split)
        if m is None or m.count == 0:
            return None
        res = residual(m, mode=mode, target_std=target_std, has_bias=self.has_bias)
        return res.within(tol)


@dataclass(frozen=True)
class Table:
    """The per-layer table as cells, for text (:func:`format_table`) and HTML.

    Attributes:
        head: Column names; the last is ``"note"``.
        body: One row of cells per layer, in forward order; the last cell is the note.
        flags: Per row, the kinds of :data:`FLAGS` its note raises (empty: nothing to say).
        notes: Per row, the notes its note cell joins, one per flag.
    """

    head: list[str]
    body: list[list[str]]
    flags: list[list[str]]
    notes: list[list[str]]


def with_unsolved(stats: Sequence[LayerStats], unsolved: Sequence) -> list[LayerStats]:
    """The solved layers' rows with rows for the layers a run leaves (``layers.Unsolved``)
    in their forward-order places."""
    left = sorted(unsolved, key=lambda u: u.position)  # stable: forward order kept
    rows: list[LayerStats] = []
    for i, row in enumerate([*stats, None]):
        while left and (row is None or left[0].position <= i):
            u = left.pop(0)
            rows.append(LayerStats(name=u.name, kind=u.kind, passes=0, converged=False,
                                   solved=False, reason=u.reason))  # fmt: skip
        if row is not None:
            rows.append(row)
    return rows


def _cell(m: mom.Moments | None) -> list[str]:
    p = figures.pooled(m)
    if p is None:
        return ["-", "-"]
    return [f"{p[0]:+.2e}", f"{p[1]:.6f}"]


def row_flags(
    row: LayerStats, *, judged: Mapping[str, float], mode: Mode, target_std: float
) -> list[tuple[str, str]]:
    """The flags of one row as ``(kind, note)`` pairs (kinds of :data:`FLAGS`), in the order
    the table prints them: not solved (with the reason), NOT CONVERGED, no bias, and OFF
    TARGET on each split of ``judged`` (split to tolerance) where it was measured."""
    notes = []
    if row.reason:
        notes.append(("not solved", f"not solved: {row.reason}"))
    elif not row.solved:
        notes.append(("not solved", "not solved yet"))
    elif not row.converged:
        notes.append(("not converged", "NOT CONVERGED"))
    if not row.has_bias and not row.reason:
        notes.append(("no bias", "no bias: mean not solved"))
    if row.dead and not row.reason:
        notes.append(("dead channels", f"{row.dead} dead channel(s): constant over the data"))
    for split, tol in judged.items():
        on = row.on_target(split, mode=mode, target_std=target_std, tol=tol)
        if on is False and not row.reason:
            notes.append(("off target", f"{split} OFF TARGET by > {tol:g}"))
    return notes


def row_notes(
    row: LayerStats, *, judged: Mapping[str, float], mode: Mode, target_std: float
) -> list[str]:
    """The notes of one row, as the table's note column joins them (see :func:`row_flags`)."""
    return [n for _, n in row_flags(row, judged=judged, mode=mode, target_std=target_std)]


def table_rows(
    rows: Sequence[LayerStats],
    *,
    splits: Sequence[str],
    solve_split: str,
    target_std: float,
    tol: float,
    mode: Mode = "tensor",
) -> Table:
    """Return the per-layer table's cells: layer, mean/std before, after per split, passes,
    note (see :func:`format_table`), and each row's flags."""
    show_before = any(r.before is not None for r in rows)
    splits = [s for s in splits if any(s in r.after for r in rows)]
    head = ["layer", "kind"] + (["mean before", "std before"] if show_before else [])
    for split in splits:
        head += [f"mean {split}", f"std {split}"]
    head += ["passes", "note"]
    body, flags, notes = [], [], []
    judged = {solve_split: tol} if solve_split else {}
    for r in rows:
        cells = [r.name or "(model)", r.kind, *(_cell(r.before) if show_before else [])]
        for split in splits:
            cells += _cell(r.after.get(split))
        pairs = row_flags(r, judged=judged, mode=mode, target_std=target_std)
        body.append([*cells, str(r.passes) if r.solved else "-", "; ".join(n for _, n in pairs)])
        flags.append([kind for kind, _ in pairs])
        notes.append([note for _, note in pairs])
    return Table(head, body, flags, notes)


def format_table(
    rows: Sequence[LayerStats],
    *,
    splits: Sequence[str],
    solve_split: str,
    target_std: float,
    tol: float,
    mode: Mode = "tensor",
) -> str:
    """Return a fixed-width table: layer, mean/std before, after per split, passes, note.

    Means and stds are pooled over all channels and positions. The note flags a layer whose
    solve did not converge, a layer without bias (its mean is not solved), a layer the run
    leaves as it is (with the reason), and a layer off target on the ``solve_split`` by the
    rule of ``solve.residual`` (per channel in channel mode); held-out splits are shown,
    not judged.
    """
    table = table_rows(
        rows, splits=splits, solve_split=solve_split, target_std=target_std, tol=tol, mode=mode
    )
    head, body = table.head, table.body
    return _columns(head, body)


def _columns(head: list[str], body: list[list[str]]) -> str:
    """Plain-text columns, left-aligned, the header underlined."""
    widths = [max(len(row[i]) for row in [head, *body]) for i in range(len(head))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(head, widths, strict=True)).rstrip()]
    lines.append("  ".join("-" * w for w in widths))
    for cells in body:
        lines.append("  ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)).rstrip())
    return "\n".join(lines)


def run_title(attrs: Mapping) -> str:
    """A run's one-line description from its root attributes, e.g. ``"mj on mnist (tensor
    mode): train 5000 samples, test 5000 samples (limit 5000)"``.

    Counts are the ones the run recorded (``dataset`` and ``holdout``); a split whose count
    is not recorded is named without one.
    """
    config = attrs.get("config") or {}
    model = attrs.get("model") or {}
    name = model.get("name") or str(model.get("class") or config.get("model", "?"))
    if not model.get("name"):
        name = name.rpartition(".")[2]
    data = attrs.get("dataset") or {}
    text = f"{name} on {data.get('name', config.get('dataset', '?'))}"
    text += f" ({config.get('mode', 'tensor')} mode)"
    limit = config.get("limit")
    parts, cut = [], -1
    for record in (data, attrs.get("holdout")):
        if not isinstance(record, Mapping) or not record:
            continue
        count, split = record.get("count"), record.get("split", "?")
        parts.append(f"{split} {count} samples" if isinstance(count, int) else f"{split} split")
        if limit is not None and count == limit:
            cut = len(parts) - 1  # the limit is named once, after the last count it cut
    if not isinstance(attrs.get("holdout"), Mapping) and config.get("holdout"):
        parts.append(f"{config['holdout']} split")
    if cut >= 0:
        parts[cut] += f" (limit {limit})"
    return text + (": " + ", ".join(parts) if parts else "")


def check_output(path: str | os.PathLike, what: str) -> Path:
    """Return ``path`` if a file can be written there: its folder exists (none is created).

    Raises:
        StoreError: The folder is missing, or a part of the path is a file.
    """
    path = Path(path)
    folder = path.parent
    if not folder.exists():
        raise StoreError(
            f"cannot write {what} to {str(path)!r}: the folder {str(folder)!r} does not exist"
        )
    if not folder.is_dir():
        raise StoreError(f"cannot write {what} to {str(path)!r}: {str(folder)!r} is a file")
    if path.is_dir():
        raise StoreError(f"cannot write {what} to {str(path)!r}: it is a folder")
    return path


def write_atomic(path: str | os.PathLike, data: bytes, what: str) -> Path:
    """Write ``data`` to ``path`` whole or not at all: a temporary file in the same folder,
    renamed into place. The file's mode is ``0o666`` less the umask, as for ``open``.

    Raises:
        StoreError: Naming ``what`` and the path, when the folder is missing or unwritable.
    """
    path = check_output(path, what)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:12]}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # umask applies
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except OSError as exc:
        raise write_error(path, what, exc) from None
    finally:
        tmp.unlink(missing_ok=True)
    return path


def _format(path: str | os.PathLike, what: str) -> str:
    """The figure format of ``path`` by its extension, once its folder is checked.

    Raises:
        ConfigError: An extension other than ``.png``, ``.svg``, ``.pdf``.
        StoreError: The folder does not exist.
    """
    path = Path(path)
    fmt = path.suffix.lower().lstrip(".")
    if fmt not in figures.FORMATS:
        raise ConfigError(
            f"cannot draw {what} to {str(path)!r}: unknown file type {path.suffix or '(none)'!r}"
            f"; use one of {', '.join('.' + f for f in figures.FORMATS)}"
        )
    check_output(path, what)
    return fmt


def plot_stats(
    rows: Sequence[LayerStats],
    path: str | os.PathLike,
    *,
    splits: Sequence[str],
    solve_split: str | None = None,
    target_std: float = 1.0,
    tol: float | None = None,
    mode: Mode = "tensor",
    title: str = "",
) -> Path:
    """Draw per-layer std, mean and residuals before and after LSUV to an image file.

    Three panels share the layer axis (forward order): the output std before and after per
    split (log scale, the target as a line), the mean, and after LSUV the residuals
    |std - target| and |mean| per split (``solve.residual``'s rule, log scale; exactly 0
    is drawn on a marked floor). Every series has its own colour and marker. Layers the
    table flags (not solved, not converged, off target, no bias) are shaded, their tick
    labels coloured, and the flags named in a legend; a layer without bias has its mean
    marked "no bias", not judged.

    Args:
        rows: Per-layer statistics in forward order.
        path: The file; its extension picks the format (``.png`` at 150 dpi, ``.svg``,
            ``.pdf``). Its folder must exist.
        splits: The splits measured after LSUV, the solved one first.
        solve_split: The split judged for "off target" (default: the first of ``splits``).
        target_std: The std the run aimed at.
        tol: The tolerance judged by, drawn on the residual panel; ``None``: nothing judged.
        mode: ``"tensor"`` or ``"channel"`` (residuals are the worst channel's).
        title: Figure title (see :func:`run_title`).

    Returns:
        ``path``.

    Raises:
        ConfigError: An extension other than ``.png``, ``.svg``, ``.pdf``.
        StoreError: The folder does not exist or cannot be written.
    """
    fmt = _format(path, "the plot")
    solve_split = splits[0] if solve_split is None and splits else solve_split or ""
    table = table_rows(
        rows,
        splits=splits,
        solve_split=solve_split if tol is not None else "",  # no tolerance: nothing judged
        target_std=target_std,
        tol=tol or 0.0,
        mode=mode,
    )
    fig = figures.stats_figure(
        rows,
        splits=splits,
        flags=table.flags,
        target_std=target_std,
        tol=tol,
        solve_split=solve_split,
        mode=mode,
        title=title,
    )
    return write_atomic(path, figures.render(fig, fmt), "the plot")


def format_running(
    curves: Mapping[str, Running | None], *, epsilons: Sequence[float] = EPSILONS
) -> str:
    """Return a fixed-width table: per layer, the samples after which its running estimate
    stayed within each of ``epsilons`` (``running.samples_within``), of how many.

    "not within" means only the whole split is; "no record" marks a layer without a
    running estimate (solved by a version that did not record them).
    """
    head = ["layer", "samples", *(f"within {eps:g}" for eps in epsilons)]
    body = []
    for name, curve in curves.items():
        if curve is None:
            body.append([name or "(model)", "-", *("no record" for _ in epsilons)])
            continue
        counts = [samples_within(curve, eps) for eps in epsilons]
        body.append([name or "(model)", str(int(curve.samples[-1])),
                     *("not within" if n is None else str(n) for n in counts)])  # fmt: skip
    return _columns(head, body)


def plot_running(
    curves: Mapping[str, Running],
    path: str | os.PathLike,
    *,
    epsilons: Sequence[float] = EPSILONS,
    title: str = "",
) -> Path:
    """Draw each layer's running-estimate deviation by samples seen (``figures.running_figure``)
    to an image file; its extension picks the format (``.png``, ``.svg``, ``.pdf``).

    Raises:
        ConfigError: Another extension.
        StoreError: The folder does not exist or cannot be written.
    """
    fmt = _format(path, "the convergence plot")
    fig = figures.running_figure(curves, levels=epsilons, title=title)
    return write_atomic(path, figures.render(fig, fmt), "the convergence plot")
