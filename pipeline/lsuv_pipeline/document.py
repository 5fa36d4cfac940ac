"""The JSON document that ``compute``, ``show`` and ``verify`` print with ``--json``.

One document per command, on stdout (schema :data:`SCHEMA`)::

    {"schema": "lsuv-pipeline.report/1", "command": "show", "run": PATH,
     "status": "complete" | "running", "config": {...}, "dataset": {...},
     "holdout": {...} | null, "model": {...}, "numerics": {...},
     "verification": {"split", "tol", "off_target"} | null, "on_target": bool | null,
     "unsolved": [{"name", "kind", "reason"}], "tied": [...],
     "layers": [{"name", "kind", "solved", "reason", "has_bias", "passes", "converged",
                 "residual": {"mean", "std"} | null,
                 "before": {SPLIT: MOMENTS} , "after": {SPLIT: MOMENTS}, "flags": [...]}],
     "outcome": {...}  (compute),  "verify": {"split", "tol", "failures"}  (verify)}

    MOMENTS = {"count", "mean", "std", "residual_mean", "residual_std", "on_target"}

Means and stds are pooled over channels and positions; the residuals are the worst
|mean| and |std - target| by ``solve.residual``'s rule (per channel in channel mode);
``on_target`` is that rule's verdict at the tolerance the split is judged by, or ``null``
for a split that is reported, not judged (a held-out split). A number that is not finite
is ``null``. Nothing here computes statistics: it lays out what the store holds.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

from . import moments as mom
from .report import LayerStats, row_notes
from .solve import residual

__all__ = ["SCHEMA", "document"]

#: The name and version of the document's layout.
SCHEMA = "lsuv-pipeline.report/1"


def _number(x) -> float | None:
    x = float(x)
    return x if math.isfinite(x) else None


def _moments(m: mom.Moments, *, config, has_bias: bool, tol: float | None) -> dict:
    pooled = mom.reduce_channels(m)
    res = residual(m, mode=config.mode, target_std=config.target_std, has_bias=has_bias)
    return {
        "count": int(m.count),
        "mean": _number(pooled.mean.item()),
        "std": _number(pooled.std.item()),
        "residual_mean": _number(res.mean),
        "residual_std": _number(res.std),
        "on_target": None if tol is None else res.within(tol),
    }


def _layer(row: LayerStats, attrs: Mapping, *, config, judged: Mapping[str, float]) -> dict:
    before = {} if row.before is None else {config.split: row.before}
    # fmt: off
    out = {
        "name": row.name,
        "kind": row.kind,
        "solved": row.solved and not row.reason,
        "reason": row.reason or None,
        "has_bias": row.has_bias,
        "passes": row.passes,
        "converged": row.converged if row.solved and not row.reason else None,
        "residual": None,
        "before": {s: _moments(m, config=config, has_bias=row.has_bias, tol=None)
                   for s, m in before.items() if m.count},
        "after": {s: _moments(m, config=config, has_bias=row.has_bias, tol=judged.get(s))
                  for s, m in row.after.items() if m.count},
        "flags": row_notes(row, judged=judged, mode=config.mode, target_std=config.target_std),
    }
    # fmt: on
    if "residual_std" in attrs:  # what the solve predicted or measured when it committed
        out["residual"] = {
            "mean": _number(attrs.get("residual_mean", math.nan)),
            "std": _number(attrs["residual_std"]),
        }
    return out


def document(
    run,
    command: str,
    *,
    rows: Sequence[LayerStats] | None = None,
    judged: Mapping[str, float] | None = None,
    extra: Mapping | None = None,
) -> dict:
    """The JSON document of a run (``checkpoint.Run``) for ``command``.

    Args:
        run: The opened run.
        command: ``"compute"``, ``"show"`` or ``"verify"``.
        rows: Per-layer statistics (default: what the store holds, ``Run.stats()``).
        judged: The tolerance each judged split is held to (default: the solve split at
            the run's ``tol``); other splits are reported, not judged.
        extra: Keys added at the top level (``outcome``, ``verify``).
    """
    config = run.config
    attrs = run.attrs
    judged = {config.split: config.tol} if judged is None else dict(judged)
    rows = run.stats() if rows is None else rows
    record = attrs.get("verification") if isinstance(attrs.get("verification"), dict) else None
    on_target = None if record is None else not record.get("off_target")
    doc = {
        "schema": SCHEMA,
        "command": command,
        "run": str(run.path),
        "status": run.status,
        "config": config.to_dict(),
        "dataset": attrs.get("dataset"),
        "holdout": attrs.get("holdout"),
        "model": attrs.get("model"),
        "numerics": attrs.get("numerics"),
        "versions": attrs.get("versions"),
        "verification": record,
        "on_target": on_target,
        "unsolved": attrs.get("unsolved", []),
        "tied": attrs.get("tied", []),
        "layers": [
            _layer(r, run.layer_attrs(r.name) if r.solved else {}, config=config, judged=judged)
            for r in rows
        ],
    }
    doc.update(extra or {})
    return doc
