"""Figures of per-layer statistics, of iterated layers' convergence, and of running estimates.

Drawn on :class:`matplotlib.figure.Figure` with the Agg canvas, never through pyplot, so a
caller's backend, open figures and settings are left as they were. Matplotlib is imported
when a figure is drawn, not with this module (``--help`` stays fast).
"""

from __future__ import annotations

import io
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from . import moments as mom
from .running import Running
from .solve import Mode, Residual, residual

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = [
    "AFTER",
    "BEFORE",
    "DPI",
    "FLAG_COLOURS",
    "FORMATS",
    "Style",
    "convergence_figure",
    "pooled",
    "render",
    "running_figure",
    "stats_figure",
    "zero_floor",
]

#: File formats a figure is written in, by extension.
FORMATS = ("png", "svg", "pdf")
#: Resolution of PNG files.
DPI = 150


@dataclass(frozen=True)
class Style:
    """How one series is drawn: colour, marker, filled or hollow, line style."""

    colour: str
    marker: str
    filled: bool
    line: str = "-"


#: The initial weights' series.
BEFORE = Style("#595959", "o", False, "--")
#: The after-LSUV series, one per split in order (the solved split first).
AFTER = (
    Style("tab:blue", "s", True),
    Style("tab:orange", "D", False),
    Style("tab:green", "^", True),
    Style("tab:brown", "v", False),
)
#: Shading and tick-label colour of a flagged layer, by flag kind (``report.FLAGS``).
FLAG_COLOURS = {
    "not solved": "#8c8c8c",
    "off target": "#d62728",
    "not converged": "#b8860b",
    "no bias": "#7b3fa0",
    "dead channels": "#2f6f8f",
}
_NO_BIAS = FLAG_COLOURS["no bias"]


def pooled(m: mom.Moments | None) -> tuple[float, float] | None:
    """The mean and std of ``m`` pooled over channels, or ``None`` if nothing was measured."""
    if m is None or m.count == 0:
        return None
    t = mom.reduce_channels(m)
    return t.mean.item(), t.std.item()


def _draw(ax, ys: Sequence[float], style: Style, label: str, shift: float = 0.0, **kw) -> None:
    """One series over the layer axis, moved by ``shift``; NaN leaves a gap. A series with
    nothing measured is not drawn (nor named in the legend)."""
    if all(math.isnan(y) for y in ys):
        return
    look = {
        "ls": style.line,
        "marker": style.marker,
        "color": style.colour,
        "mec": style.colour,
        "mfc": style.colour if style.filled else "none",
        "ms": 6.5 if style.filled else 8.5,
        "mew": 1.4,
        "lw": 1.1,
        "zorder": 3 if style.filled else 4,  # hollow on top: a filled one shows through
    }
    ax.plot([i + shift for i in range(len(ys))], ys, label=label, **{**look, **kw})


def _nan(v: float | None) -> float:
    return v if v is not None and math.isfinite(v) else math.nan


def zero_floor(values: Sequence[float]) -> float:
    """A level a decade below the smallest positive value, where exact zeros are drawn."""
    positive = [v for v in values if v > 0 and math.isfinite(v)]
    return 10.0 ** (math.floor(math.log10(min(positive))) - 1) if positive else 1e-16


def _floored(ax, series: list[list[float]]) -> list[list[float]]:
    """``series`` with exact zeros raised to a floor, marked on ``ax`` when one is drawn."""
    floor = zero_floor([v for ys in series for v in ys])
    if any(v == 0 for ys in series for v in ys):
        ax.axhline(
            floor, color="0.5", ls=(0, (1, 2)), lw=1.0, label=f"exactly 0 (drawn at {floor:.0e})"
        )
    return [[floor if v == 0 else v for v in ys] for ys in series]


def _flags(axes, flags: Sequence[Sequence[str]], solve_split: str, tol) -> list:
    """Shade flagged layers, colour their tick labels; return legend handles of the flags."""
    from matplotlib.patches import Patch

    text = {
        "not solved": "not solved (left as it is)",
        "not converged": "NOT CONVERGED",
        "off target": f"{solve_split} OFF TARGET by > {tol:g}" if tol else "off target",
        "no bias": "no bias: mean not solved",
    }
    seen: list[str] = []
    labels = axes[-1].get_xticklabels()
    order = list(FLAG_COLOURS)
    for i, kinds in enumerate(flags):
        if not kinds:
            continue
        kinds = sorted(kinds, key=order.index)
        width = 0.9 / len(kinds)  # a column with several flags is striped, one per flag
        for j, kind in enumerate(kinds):
            left = i - 0.45 + j * width
            for ax in axes:
                ax.axvspan(left, left + width, color=FLAG_COLOURS[kind], alpha=0.13, lw=0, zorder=0)
        labels[i].set_color(FLAG_COLOURS[kinds[0]])
        labels[i].set_fontweight("bold")
        if "not solved" in kinds:
            axes[0].text(
                i,
                0.5,
                "not solved",
                transform=axes[0].get_xaxis_transform(),
                rotation=90,
                ha="center",
                va="center",
                fontsize=8,
                color="0.3",
            )
        seen += [k for k in kinds if k not in seen]
    return [
        Patch(facecolor=FLAG_COLOURS[k], alpha=0.35, label=f"flagged: {text[k]}")
        for k in FLAG_COLOURS
        if k in seen
    ]


def _residual_panel(ax, rows, splits, *, mode: Mode, target_std: float, tol, solve_split):
    """|std - target| and |mean| after LSUV per split, log scale; no-bias means apart."""
    rule = {"mode": mode, "target_std": target_std}
    series, styles = [], []
    for split, style in zip(splits, AFTER, strict=False):
        measured = [(r.after.get(split), r.has_bias) for r in rows]
        res = [
            residual(m, has_bias=b, **rule) if m is not None and m.count else None
            for m, b in measured
        ]
        series.append([_nan(x.std if x else None) for x in res])
        series.append([_nan(x.mean if x and x.has_bias else None) for x in res])
        series.append([_nan(x.mean if x and not x.has_bias else None) for x in res])
        styles.append((split, style))
    series = _floored(ax, series)
    for k, (split, style) in enumerate(styles):
        std, mean, loose = series[3 * k : 3 * k + 3]
        # std and mean side by side, so that equal values do not hide each other
        _draw(ax, std, style, f"|std - target|, {split}", -0.08, marker="^")
        _draw(ax, mean, style, f"|mean|, {split}", 0.08, marker="v", ls=":")
        no_bias = Style(_NO_BIAS, "o", style.filled)
        _draw(ax, loose, no_bias, f"|mean|, {split}, no bias (not judged)", 0.08, ls="none")
    if all(math.isnan(v) for ys in series for v in ys):
        ax.text(
            0.5,
            0.75,
            "nothing measured after LSUV yet",
            transform=ax.transAxes,
            ha="center",
            va="center",
            color="0.3",
            bbox={"facecolor": "white", "edgecolor": "none"},
        )
    if tol:
        ax.axhline(
            tol,
            color=FLAG_COLOURS["off target"],
            ls="--",
            lw=1.0,
            label=f"tol {tol:g} (judged on {solve_split})",
        )
    ax.set_yscale("log")
    where = "worst channel" if mode == "channel" else "pooled"
    ax.set_ylabel(f"residual after LSUV\n({where})")
    ax.set_title("after LSUV: |std - target| and |mean| (log scale)", loc="left", fontsize=9)


def _plain_log_ticks(ax) -> None:
    """Label a log axis with plain numbers (0.1, 1), and 0.2, 0.5 between them when it spans
    two decades or less."""
    from matplotlib.ticker import FuncFormatter, NullFormatter

    def minor(v, _):
        return f"{v:g}" if round(v / 10 ** math.floor(math.log10(v) + 1e-9)) in (2, 5) else ""

    lo, hi = ax.get_ylim()
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.yaxis.set_minor_formatter(FuncFormatter(minor) if hi / lo <= 100 else NullFormatter())


def _legend(ax, handles=None) -> None:
    handles = (handles or []) + ax.get_legend_handles_labels()[0]
    if handles:
        ax.legend(
            handles=handles,
            loc="upper left",
            bbox_to_anchor=(1.01, 1.0),
            fontsize=8,
            frameon=False,
            borderaxespad=0.0,
        )


def _moment_panels(ax_std, ax_mean, rows, splits, *, solve_split: str, target_std: float):
    """Std (log scale) and mean before and after LSUV per split; no-bias means ringed."""
    what = [("before LSUV (initial weights), " + (solve_split or "train"), BEFORE, "before")]
    what += [(f"after LSUV, {s}", st, s) for s, st in zip(splits, AFTER, strict=False)]
    for label, style, key in what:
        got = [pooled(r.before if key == "before" else r.after.get(key)) for r in rows]
        _draw(ax_std, [p[1] if p else math.nan for p in got], style, label)
        _draw(ax_mean, [p[0] if p else math.nan for p in got], style, "_" + label)  # as above
    loose = [i for i, r in enumerate(rows) if not r.has_bias and r.after]
    for i in loose:
        means = [p[0] for p in (pooled(m) for m in rows[i].after.values()) if p]
        ax_mean.plot(
            [i] * len(means),
            means,
            ls="none",
            marker="o",
            ms=15,
            mfc="none",
            mec=_NO_BIAS,
            mew=1.6,
            zorder=5,
            label="no bias: mean not solved" if i == loose[0] else None,
        )
    ax_std.axhline(target_std, color="black", lw=0.8, ls="--", label=f"target std {target_std:g}")
    ax_std.set_yscale("log")
    _plain_log_ticks(ax_std)
    ax_std.set_ylabel("output std (log)")
    ax_std.set_title("output std, pooled over channels and positions", loc="left", fontsize=9)
    ax_mean.axhline(0.0, color="black", lw=0.8, ls="--", label="mean 0")
    ax_mean.set_ylabel("output mean")
    ax_mean.set_title("output mean, pooled (series as above)", loc="left", fontsize=9)


def stats_figure(
    rows: Sequence,
    *,
    splits: Sequence[str],
    flags: Sequence[Sequence[str]],
    target_std: float = 1.0,
    tol: float | None = None,
    solve_split: str = "",
    mode: Mode = "tensor",
    title: str = "",
) -> Figure:
    """Per-layer std, mean and residuals before and after LSUV (see ``report.plot_stats``).

    Args:
        rows: ``report.LayerStats`` in forward order.
        splits: The splits measured after LSUV, the solved one first.
        flags: Per row, its flag kinds (``report.Table.flags``).
        target_std, tol, solve_split, mode, title: As for ``report.plot_stats``.
    """
    from matplotlib.figure import Figure

    n = len(rows)
    fig = Figure(figsize=(max(9.0, 0.36 * n + 6.0), 10.5), layout="constrained")
    ax_std, ax_mean, ax_res = fig.subplots(3, 1, sharex=True, height_ratios=[1.15, 1, 1.25])
    _moment_panels(ax_std, ax_mean, rows, splits, solve_split=solve_split, target_std=target_std)
    _residual_panel(
        ax_res, rows, splits, mode=mode, target_std=target_std, tol=tol, solve_split=solve_split
    )
    ax_res.set_xticks(
        range(n),
        [r.name or "(model)" for r in rows],
        rotation=45,
        ha="right",
        rotation_mode="anchor",
        fontsize=8 if n <= 40 else 6,
    )
    ax_res.set_xlabel("layer, in forward order")
    ax_res.set_xlim(-0.6, n - 0.4)
    handles = _flags((ax_std, ax_mean, ax_res), flags, solve_split, tol)
    for ax in (ax_std, ax_mean, ax_res):
        ax.grid(alpha=0.3)
    _legend(ax_std)
    _legend(ax_mean, handles)
    _legend(ax_res)
    if title:
        fig.suptitle(title, fontsize=11)
    return fig


def convergence_figure(
    curves: Mapping[str, Sequence[Residual]], *, tol: float | None = None, title: str = ""
) -> Figure:
    """The residuals of each iterated layer, pass by pass (log scale).

    Args:
        curves: Per layer, the residual (``solve.residual``) of the output measured in each
            pass: pass 1 with the initial weights, pass k with the update of step k - 1.
        tol: The tolerance the layers were solved to, drawn as a line.
        title: Figure title.
    """
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    fig = Figure(figsize=(9.0, 4.2), layout="constrained")
    ax = fig.subplots()
    values = [[_nan(r.std) for r in c] for c in curves.values()]
    values += [[_nan(r.mean if r.has_bias else None) for r in c] for c in curves.values()]
    values = _floored(ax, values)
    k = len(curves)
    for i, name in enumerate(curves):
        style = AFTER[i % len(AFTER)]
        xs = range(1, len(values[i]) + 1)
        for ys, marker, ls, what in (
            (values[i], "^", "-", "|std - target|"),
            (values[k + i], "v", ":", "|mean|"),
        ):
            if all(math.isnan(v) for v in ys):
                continue  # a layer without bias: its mean is not solved
            ax.plot(
                xs,
                ys,
                ls=ls,
                marker=marker,
                color=style.colour,
                mec=style.colour,
                mfc=style.colour if marker == "^" else "none",
                ms=7,
                mew=1.4,
                lw=1.1,
                label=f"{name}: {what}",
            )
    if tol:
        ax.axhline(tol, color=FLAG_COLOURS["off target"], ls="--", lw=1.0, label=f"tol {tol:g}")
    ax.set_yscale("log")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("pass (pass 1: the initial weights; pass k: after k - 1 update steps)")
    ax.set_ylabel("residual, calls pooled")
    ax.grid(alpha=0.3)
    _legend(ax)
    if title:
        ax.set_title(title, loc="left", fontsize=10)
    return fig


def running_figure(
    curves: Mapping[str, Running], *, levels: Sequence[float] = (), title: str = ""
) -> Figure:
    """How far each layer's running estimate is from the full split's, by samples seen.

    Two panels (log-log), the mean's deviation and the std's (``running.Running``: in units
    of ``target_std`` after LSUV), one line per layer; the last row (the full split, 0 by
    definition) is left out, exact zeros before it are drawn on a marked floor.

    Args:
        curves: Per layer, its running estimate.
        levels: Deviations drawn as lines (the ``eps`` the report counts samples for).
        title: Figure title.
    """
    from matplotlib.figure import Figure
    from matplotlib.ticker import FuncFormatter, NullFormatter

    fig = Figure(figsize=(10.0, 4.4), layout="constrained")
    ax_mean, ax_std = fig.subplots(1, 2, sharex=True, sharey=True)
    names = list(curves)
    series = [[_nan(v) for v in curves[n].mean_dev[:-1].tolist()] for n in names]
    series += [[_nan(v) for v in curves[n].std_dev[:-1].tolist()] for n in names]
    series = _floored(ax_std, series)
    k = len(names)
    for i, name in enumerate(names):
        xs = curves[name].samples[:-1].tolist()
        colour = f"C{i % 10}"
        for ax, ys in ((ax_mean, series[i]), (ax_std, series[k + i])):
            ax.plot(xs, ys, marker=".", ms=4, lw=1.1, color=colour, label=name)
    for ax, what in ((ax_mean, "|mean_n - mean|"), (ax_std, "|std_n - std|")):
        for j, eps in enumerate(levels):
            ax.axhline(eps, color="0.3", ls=("--", ":")[j % 2], lw=1.0, label=f"{eps:g}")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        ax.xaxis.set_minor_formatter(NullFormatter())  # labelled minors overlap
        ax.set_xlabel("samples seen (shards in order)")
        ax.set_title(f"{what} / std (after LSUV: in target_std)", loc="left", fontsize=9)
        ax.grid(alpha=0.3, which="both")
    ax_mean.set_ylabel("deviation from the full split (worst channel in channel mode)")
    _legend(ax_std)
    if title:
        fig.suptitle(title, fontsize=11)
    return fig


def render(fig: Figure, fmt: str) -> bytes:
    """The figure as a file of format ``fmt`` (one of :data:`FORMATS`), PNG at :data:`DPI`.

    SVG keeps its text as text (searchable and small).
    """
    import matplotlib
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    metadata = {"svg": {"Date": None}, "pdf": {"CreationDate": None}}.get(fmt)
    rc = {"svg.fonttype": "none"} if fmt == "svg" else {}
    with matplotlib.rc_context(rc):
        fig.savefig(buf, format=fmt, dpi=DPI, metadata=metadata)
    return buf.getvalue()
