"""The report page of a run: one self-contained HTML file a person reads or hands on.

The page holds the run's status and verification verdict, the per-layer table (the rows of
``Run.table()``, flags coloured), the per-layer plot and the convergence of the layers
solved in more than one pass, both inline SVG, and the run's provenance: model, data,
configuration, numerics and versions. It references nothing outside itself (no script, no
style sheet, no image file, no font), so it renders offline. Every text is escaped.

:func:`page_of` collects what a run store records into a :class:`Page`; :func:`render_page`
turns a page into HTML and nothing else; :func:`write_report` writes it.
"""

from __future__ import annotations

import html
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from . import figures
from .errors import StoreError, write_error
from .report import Table, run_title, table_rows, write_atomic
from .solve import residual

if TYPE_CHECKING:
    from .checkpoint import Run

__all__ = ["PAGE_NAME", "Page", "page_of", "render_page", "write_report"]

#: The file name of the page in its folder.
PAGE_NAME = "index.html"

_STYLE = """
body { font-family: system-ui, -apple-system, "Segoe UI", "DejaVu Sans", sans-serif;
  color: #1d1d1f; margin: 0; background: #fafafa; line-height: 1.4; }
main { max-width: 1200px; margin: 0 auto; padding: 24px 32px 48px; background: #fff; }
h1 { font-size: 1.5em; margin: 0 0 4px; } h2 { font-size: 1.2em; margin: 32px 0 8px;
  border-bottom: 1px solid #ddd; padding-bottom: 4px; } h3 { font-size: 1em; margin: 16px 0 4px; }
.subtitle { color: #555; margin: 0 0 16px; }
.verdict { border-left: 6px solid #888; background: #f3f3f3; padding: 8px 14px; }
.verdict.ok { border-color: #2e7d32; background: #edf7ee; }
.verdict.bad { border-color: #d62728; background: #fdeeee; }
.verdict p { margin: 4px 0; }
table { border-collapse: collapse; font-size: 0.9em; }
th, td { padding: 3px 10px; text-align: left; vertical-align: top; }
table.layers th { border-bottom: 2px solid #bbb; white-space: nowrap; }
table.layers td { border-bottom: 1px solid #eee; white-space: nowrap; }
table.layers td.num { text-align: right; font-family: ui-monospace, "DejaVu Sans Mono",
  monospace; }
table.facts { width: 100%; table-layout: fixed; }
table.facts th { color: #555; font-weight: normal; width: 14em; }
table.facts td { font-family: ui-monospace, "DejaVu Sans Mono", monospace;
  word-break: break-all; }
.flag { display: inline-block; border-radius: 3px; padding: 0 6px; margin-right: 4px;
  color: #fff; font-size: 0.85em; }
figure { margin: 8px 0; } figure svg { width: 100%; height: auto; display: block; }
figure.small svg { max-width: 860px; }
figcaption, .note { color: #555; font-size: 0.9em; }
footer { margin-top: 32px; color: #777; font-size: 0.85em; }
"""


@dataclass(frozen=True)
class Page:
    """What the page of a run shows, as text (escaped when rendered) and inline SVG.

    Attributes:
        title: The run in one line (``report.run_title``).
        status: The run's status, e.g. ``"complete"``, with how far it got.
        verdict: The verification verdict in one line.
        verdict_ok: ``True`` on target, ``False`` off target, ``None`` not verified.
        table: The per-layer table (``report.table_rows``).
        plot_svg: The per-layer plot, an ``<svg>`` element.
        convergence_svg: The convergence plot, or ``""`` when no layer took more than a pass.
        convergence: Rows ``(layer, pass, |mean|, |std - target|)`` of those layers.
        convergence_note: What the convergence section says (one line).
        facts: Provenance: sections of ``(key, value)`` pairs.
        footer: Who wrote the page, from what.
    """

    title: str
    status: str
    verdict: str
    verdict_ok: bool | None
    table: Table
    plot_svg: str = ""
    convergence_svg: str = ""
    convergence: list[tuple[str, str, str, str]] = field(default_factory=list)
    convergence_note: str = ""
    facts: list[tuple[str, list[tuple[str, str]]]] = field(default_factory=list)
    footer: str = ""


def _svg(data: bytes, prefix: str) -> str:
    """A matplotlib SVG file as an element to inline: no XML prolog, DOCTYPE or metadata, and
    its ids (and the references to them) prefixed, so that several can share a page."""
    text = data.decode("utf-8")
    text = text[text.index("<svg") :]
    text = re.sub(r"<metadata>.*?</metadata>\s*", "", text, flags=re.S)
    text = re.sub(r'(\sid=")', rf"\g<1>{prefix}-", text)
    return re.sub(r'(href="#|url\(#)', rf"\g<1>{prefix}-", text)


def _text(value) -> str:
    if isinstance(value, str):
        return value
    return json.dumps(value, sort_keys=True)


def _data_facts(role: str, record) -> list[tuple[str, str]]:
    if not isinstance(record, Mapping):
        return []
    count = record.get("count")
    out = [
        (
            role,
            f"{record.get('name', '?')} / {record.get('split', '?')}, "
            f"{count if count is not None else '?'} samples",
        )
    ]
    user = (record.get("transform") or {}).get("user")
    if user:
        out.append(("samples", f"given by the caller ({_text(user)})"))
    for key in ("fingerprint", "sample_shape", "num_classes", "transform"):
        if key in record and not (key == "transform" and user):
            out.append((f"{role} {key.replace('_', ' ')}", _text(record[key])))
    return out


def _model_facts(model: Mapping) -> list[tuple[str, str]]:
    out = [("class", str(model.get("class", "?")))]
    if model.get("source") == "built":
        kwargs = model.get("kwargs") or {}
        built = f"{model.get('name')}, seed {model.get('seed')}"
        out.append(("built as", built + (f", kwargs {_text(kwargs)}" if kwargs else "")))
    else:
        out.append(("built as", "given by the caller (its initial weights are recorded)"))
    out += [(f"{k} fingerprint", str(model[k])) for k in ("structure", "initial") if k in model]
    return out


def _facts(run: Run) -> list[tuple[str, list[tuple[str, str]]]]:
    """The provenance sections of the page."""
    attrs = run.attrs
    versions = attrs.get("versions") or {}
    tool = f"{attrs.get('tool', 'lsuv-pipeline')} {versions.get('lsuv-pipeline', '')}".strip()
    runs = [("store", str(run.path)), ("run id", str(attrs.get("run_id", "?"))), ("tool", tool)]
    runs += [("schema", _text(attrs["schema"]))] if "schema" in attrs else []
    device = str(attrs.get("device", "?"))
    if attrs.get("allow_tf32"):
        device += " (TF32 allowed)"
    runs.append(("device", device))
    data = _data_facts("data", attrs.get("dataset")) + _data_facts("holdout", attrs.get("holdout"))
    numerics = attrs.get("numerics")
    if isinstance(numerics, Mapping) and numerics:
        num = [("fingerprint", _text(numerics.get("key", "?")))]
        num += [(k.replace("_", " "), _text(v)) for k, v in numerics.items() if k != "key"]
    else:
        num = [("fingerprint", "not recorded")]
    config = [(k, _text(v)) for k, v in (attrs.get("config") or {}).items()]
    return [
        ("Run", runs),
        ("Model", _model_facts(attrs.get("model") or {})),
        ("Data", data or [("data", "not recorded")]),
        ("Configuration", config),
        ("Numerics", num),
        ("Versions", [(k, _text(v)) for k, v in versions.items()]),
    ]


def _verdict(run: Run) -> tuple[str, bool | None]:
    record = run.attrs.get("verification")
    if isinstance(record, Mapping):
        off = list(record.get("off_target") or [])
        tol = record.get("tol")
        where = f"on {record.get('split', '?')} at tol {tol:g}" if tol else "on target"
        if off:
            return f"verified {where}: OFF TARGET: {', '.join(off)}", False
        return f"verified {where}: every solved layer on target", True
    if not run.config.verify:
        return "not verified: verification was off for this run", None
    return "not verified yet: the run has not finished its verification", None


def _status(run: Run, rows) -> str:
    solved = sum(1 for r in rows if r.solved and not r.reason)
    left = [r.name for r in rows if r.reason]
    text = f"{run.status}: {solved} of {len(run.layers)} target layer(s) solved"
    if run.status != "complete":
        text += " so far; rerun its compute command to finish it"
    if left:
        text += f"; {len(left)} layer(s) left as they are ({', '.join(left)})"
    return text


def _convergence(run: Run, rows) -> tuple[str, list[tuple[str, str, str, str]], str]:
    """The convergence plot, its numbers, and the section's line."""
    rule = {"mode": run.config.mode, "target_std": run.config.target_std}
    curves = {}
    for r in rows:
        if r.passes > 1:
            measured = run.passes(r.name)
            if len(measured) > 1:
                curves[r.name] = [residual(m, has_bias=r.has_bias, **rule) for m in measured]
    if not curves:
        return "", [], "No layer needed more than one pass: every layer was solved in one step."
    numbers = [
        (name, str(i), f"{x.mean:.3e}" if x.has_bias else f"{x.mean:.3e} (no bias)", f"{x.std:.3e}")
        for name, res in curves.items()
        for i, x in enumerate(res, start=1)
    ]
    what = "worst channel" if run.config.mode == "channel" else "pooled over channels"
    fig = figures.convergence_figure(
        curves, tol=run.config.tol, title=f"residual per pass ({what})"
    )
    outcome = {r.name: r for r in rows}
    names = "; ".join(
        f"{name}: {'converged' if outcome[name].converged else 'NOT CONVERGED'} in "
        f"{outcome[name].passes} passes"
        for name in curves
    )
    note = (
        f"{len(curves)} layer(s) solved in more than one pass ({names}, max_iter "
        f"{run.config.max_iter}): their calls feed each other, so the solve repeats the "
        "layer's pass until it is on target. Pass 1 measures the initial weights; each later "
        "pass the update of the step before."
    )
    return _svg(figures.render(fig, "svg"), "convergence"), numbers, note


def page_of(run: Run) -> Page:
    """Collect what the page of ``run`` shows from its store."""
    config = run.config
    rows = run.stats()
    table = table_rows(
        rows,
        splits=run.splits,
        solve_split=config.split,
        target_std=config.target_std,
        tol=config.tol,
        mode=config.mode,
    )
    title = run_title(run.attrs)
    fig = figures.stats_figure(
        rows,
        splits=run.splits,
        flags=table.flags,
        target_std=config.target_std,
        tol=config.tol,
        solve_split=config.split,
        mode=config.mode,
        title=title,
    )
    conv_svg, conv_rows, conv_note = _convergence(run, rows)
    verdict, ok = _verdict(run)
    versions = run.attrs.get("versions") or {}
    return Page(
        title=title,
        status=_status(run, rows),
        verdict=verdict,
        verdict_ok=ok,
        table=table,
        plot_svg=_svg(figures.render(fig, "svg"), "plot"),
        convergence_svg=conv_svg,
        convergence=conv_rows,
        convergence_note=conv_note,
        facts=_facts(run),
        footer=f"Written by lsuv-pipeline {versions.get('lsuv-pipeline', '')} from {run.path}.",
    )


def _cells(cells: Sequence[str], numeric: Sequence[bool]) -> str:
    return "".join(
        f'<td class="num">{html.escape(c)}</td>' if num else f"<td>{html.escape(c)}</td>"
        for c, num in zip(cells, numeric, strict=True)
    )


def _layer_table(table: Table) -> str:
    """The per-layer table; a flagged row names its flags in coloured badges."""
    head = "".join(f"<th>{html.escape(h)}</th>" for h in table.head)
    numeric = [h.startswith(("mean", "std")) or h == "passes" for h in table.head[:-1]]
    body = []
    for cells, kinds, notes in zip(table.body, table.flags, table.notes, strict=True):
        badges = "".join(
            f'<span class="flag" style="background:{figures.FLAG_COLOURS[k]}">'
            f"{html.escape(n)}</span>"
            for k, n in zip(kinds, notes, strict=True)
        )
        cls = " ".join(f"flag-{k.replace(' ', '-')}" for k in kinds)
        row = _cells(cells[:-1], numeric) + f"<td>{badges}</td>"
        body.append(f'<tr class="{cls}">{row}</tr>' if cls else f"<tr>{row}</tr>")
    return (
        f'<table class="layers"><thead><tr>{head}</tr></thead>'
        f"<tbody>{''.join(body)}</tbody></table>"
    )


def _facts_html(facts) -> str:
    parts = []
    for section, pairs in facts:
        rows = "".join(
            f"<tr><th>{html.escape(k)}</th><td>{html.escape(v)}</td></tr>" for k, v in pairs
        )
        parts.append(f'<h3>{html.escape(section)}</h3><table class="facts">{rows}</table>')
    return "".join(parts)


def _convergence_html(page: Page) -> str:
    out = f'<p class="note">{html.escape(page.convergence_note)}</p>'
    if page.convergence_svg:
        out += f'<figure class="small">{page.convergence_svg}</figure>'
    if page.convergence:
        head = "".join(f"<th>{h}</th>" for h in ("layer", "pass", "|mean|", "|std - target|"))
        rows = "".join(f"<tr>{_cells(r, [False, True, True, True])}</tr>" for r in page.convergence)
        out += f'<table class="layers"><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>'
    return out


def render_page(page: Page) -> str:
    """The HTML of ``page``: one document, every text escaped, the SVGs inlined as given."""
    e = html.escape
    verdict = {True: "ok", False: "bad", None: "none"}[page.verdict_ok]
    plot = (
        f"<figure>{page.plot_svg}<figcaption>Means and stds are pooled over channels and "
        "positions; the residuals follow the rule the run is judged by. Shaded columns are "
        "the layers the table flags.</figcaption></figure>"
        if page.plot_svg
        else '<p class="note">No plot.</p>'
    )
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>LSUV run: {e(page.title)}</title>
<style>{_STYLE}</style>
</head>
<body>
<main>
<h1>LSUV run report</h1>
<p class="subtitle">{e(page.title)}</p>
<section class="verdict {verdict}">
<p><strong>Status:</strong> {e(page.status)}</p>
<p><strong>Verification:</strong> {e(page.verdict)}</p>
</section>
<h2>Per-layer statistics</h2>
{_layer_table(page.table)}
<h2>Plot</h2>
{plot}
<h2>Convergence</h2>
{_convergence_html(page)}
<h2>Provenance</h2>
{_facts_html(page.facts)}
<footer>{e(page.footer)}</footer>
</main>
</body>
</html>
"""


def write_report(run: Run, folder: str | Path) -> Path:
    """Write the page of ``run`` to ``folder/index.html`` (:data:`PAGE_NAME`); return it.

    The folder is created if it is missing and its parent exists. The page is written to a
    temporary file in the folder and renamed into place, with the mode a new file gets
    (0o666 less the umask); a page already there is replaced.

    Raises:
        StoreError: The folder's parent is missing, the folder is a file, or a write failed.
    """
    folder = Path(folder)
    if not folder.exists():
        parent = folder.parent
        if not parent.is_dir():
            raise StoreError(
                f"cannot write the report to {str(folder)!r}: its parent folder "
                f"{str(parent)!r} does not exist"
            )
        try:
            folder.mkdir(exist_ok=True)
        except OSError as exc:
            raise write_error(folder, "the report folder", exc) from None
    elif not folder.is_dir():
        raise StoreError(f"cannot write the report to {str(folder)!r}: it is a file, not a folder")
    text = render_page(page_of(run))
    return write_atomic(folder / PAGE_NAME, text.encode("utf-8"), "the report page")
