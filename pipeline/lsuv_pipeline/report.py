"""Tables and plots of per-layer statistics. Shows what others measured; computes nothing."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from . import moments as mom
from .solve import Mode, residual

__all__ = ["LayerStats", "format_table", "plot_stats", "with_unsolved"]


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

    def on_target(self, split: str, *, mode: Mode, target_std: float, tol: float) -> bool | None:
        """Whether its output on ``split`` is on target (``solve.residual``'s rule), or
        ``None`` when it was not measured there."""
        m = self.after.get(split)
        if m is None or m.count == 0:
            return None
        res = residual(m, mode=mode, target_std=target_std, has_bias=self.has_bias)
        return res.within(tol)


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


def _pooled(m: mom.Moments | None) -> tuple[float, float] | None:
    if m is None or m.count == 0:
        return None
    t = mom.reduce_channels(m)
    return t.mean.item(), t.std.item()


def _cell(m: mom.Moments | None) -> list[str]:
    p = _pooled(m)
    if p is None:
        return ["-", "-"]
    return [f"{p[0]:+.2e}", f"{p[1]:.6f}"]


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
    show_before = any(r.before is not None for r in rows)
    splits = [s for s in splits if any(s in r.after for r in rows)]
    head = ["layer", "kind"] + (["mean before", "std before"] if show_before else [])
    for split in splits:
        head += [f"mean {split}", f"std {split}"]
    head += ["passes", "note"]
    body = []
    for r in rows:
        cells = [r.name or "(model)", r.kind, *(_cell(r.before) if show_before else [])]
        notes = []
        if r.reason:
            notes.append(f"not solved: {r.reason}")
        elif not r.solved:
            notes.append("not solved yet")
        elif not r.converged:
            notes.append("NOT CONVERGED")
        if not r.has_bias and not r.reason:
            notes.append("no bias: mean not solved")
        for split in splits:
            cells += _cell(r.after.get(split))
            on = r.on_target(split, mode=mode, target_std=target_std, tol=tol)
            if split == solve_split and on is False and not r.reason:
                notes.append(f"{split} OFF TARGET by > {tol:g}")
        cells += [str(r.passes) if r.solved else "-", "; ".join(notes)]
        body.append(cells)
    widths = [max(len(row[i]) for row in [head, *body]) for i in range(len(head))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(head, widths, strict=True)).rstrip()]
    lines.append("  ".join("-" * w for w in widths))
    for cells in body:
        lines.append("  ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)).rstrip())
    return "\n".join(lines)


def plot_stats(
    rows: Sequence[LayerStats],
    path: str | os.PathLike,
    *,
    splits: Sequence[str],
    target_std: float = 1.0,
    title: str = "",
) -> Path:
    """Draw per-layer std (top, log scale) and mean (bottom), before and after, to a PNG.

    One line per series: "before" (initial weights, training split) and "after" per split;
    the target std and mean 0 are drawn as reference lines.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [r.name or "(model)" for r in rows]
    x = list(range(len(rows)))
    series = [("before (initial weights)", lambda r: r.before, "tab:gray", "o")]
    colours = ["tab:blue", "tab:orange", "tab:green", "tab:red"]
    for i, split in enumerate(splits):
        series.append((f"after LSUV, {split}", lambda r, s=split: r.after.get(s), colours[i], "s"))
    width = max(6.0, 0.38 * len(rows) + 2.5)
    fig, (ax_std, ax_mean) = plt.subplots(2, 1, figsize=(width, 6.5), sharex=True)
    for label, get, colour, marker in series:
        points = [(i, _pooled(get(r))) for i, r in zip(x, rows, strict=True)]
        points = [(i, p) for i, p in points if p is not None]
        if not points:
            continue
        xs = [i for i, _ in points]
        ax_std.plot(xs, [p[1] for _, p in points], marker=marker, color=colour, label=label)
        ax_mean.plot(xs, [p[0] for _, p in points], marker=marker, color=colour, label=label)
    ax_std.axhline(target_std, color="black", lw=0.8, ls="--", label=f"target std {target_std:g}")
    ax_std.set_yscale("log")
    ax_std.set_ylabel("output std")
    ax_std.legend(fontsize=8, loc="best")
    ax_mean.axhline(0.0, color="black", lw=0.8, ls="--")
    ax_mean.set_ylabel("output mean")
    ax_mean.set_xticks(x)
    ax_mean.set_xticklabels(names, rotation=60, ha="right", fontsize=8)
    ax_std.grid(alpha=0.3)
    ax_mean.grid(alpha=0.3)
    if title:
        ax_std.set_title(title)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
