"""Tables of per-layer statistics. Formats what others measured; computes nothing new."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from . import moments as mom

__all__ = ["LayerStats", "format_table"]


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
    """

    name: str
    kind: str
    passes: int
    converged: bool
    has_bias: bool = True
    solved: bool = True
    before: mom.Moments | None = None
    after: dict[str, mom.Moments] = field(default_factory=dict)


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
) -> str:
    """Return a fixed-width table: layer, mean/std before, after per split, passes, note.

    Means and stds are pooled over all channels and positions. The note flags a layer whose
    solve did not converge, a layer without bias (its mean is not solved), and a layer
    whose |mean| or |std - target| on the ``solve_split`` exceeds ``tol``; held-out splits
    are shown, not judged.
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
        if not r.solved:
            notes.append("not solved yet")
        elif not r.converged:
            notes.append("NOT CONVERGED")
        if not r.has_bias:
            notes.append("no bias: mean not solved")
        for split in splits:
            m = r.after.get(split)
            cells += _cell(m)
            p = _pooled(m)
            off = p is not None and (
                (r.has_bias and abs(p[0]) > tol) or abs(p[1] - target_std) > tol
            )
            if split == solve_split and off:
                notes.append(f"{split} off by > {tol:g}")
        cells += [str(r.passes) if r.solved else "-", "; ".join(notes)]
        body.append(cells)
    widths = [max(len(row[i]) for row in [head, *body]) for i in range(len(head))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(head, widths, strict=True)).rstrip()]
    lines.append("  ".join("-" * w for w in widths))
    for cells in body:
        lines.append("  ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)).rstrip())
    return "\n".join(lines)
