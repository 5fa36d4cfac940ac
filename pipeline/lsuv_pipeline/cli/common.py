"""What the commands share: output options, how results and notes are printed."""

from __future__ import annotations

import json
import signal

import click

from ..checkpoint import open_run
from ..data import ROOT_ENV
from ..document import document

__all__ = [
    "CLOSED_PIPE",
    "DATA_ROOT",
    "JSON",
    "OFF_TARGET",
    "QUIET",
    "RUN",
    "UsageMistake",
    "header",
    "note",
    "print_json",
    "print_result",
    "provenance",
    "set_output",
]


#: Exit status of a run or verification whose layers miss the tolerance (1 is any other
#: failure, 2 a usage mistake, 130 Ctrl-C).
OFF_TARGET = 3

#: Exit status when stdout closed before everything was printed (``| head``), as for a
#: process that SIGPIPE ended; files asked for were written before anything was printed.
CLOSED_PIPE = 128 + signal.SIGPIPE


class UsageMistake(click.ClickException):
    """A :class:`ConfigError`: exits 2, like Click's own usage errors."""

    exit_code = 2


def note(text: str) -> None:
    """An informational line: on stderr, unless ``-q``."""
    if not click.get_current_context().meta.get("quiet"):
        click.echo(text, err=True)


def set_output(ctx: click.Context, *, quiet: bool, as_json: bool = False) -> None:
    """Record the output options where the group's error handling sees them too."""
    ctx.meta["quiet"] = quiet
    ctx.meta["as_json"] = as_json


QUIET = click.option(
    "-q",
    "--quiet",
    is_flag=True,
    help="No progress bars or notes: only the layer listing, warnings, the outcome line "
    "and errors, on stderr.",
)
JSON = click.option(
    "--json",
    "as_json",
    is_flag=True,
    help="Print one JSON document (schema lsuv-pipeline.report/1) instead of the table.",
)


DATA_ROOT = click.option(
    "--data-root",
    type=click.Path(file_okay=False),
    envvar=ROOT_ENV,
    show_envvar=True,
    help="Folder holding the datasets in torchvision's layout [default: data/].",
)


RUN = click.argument("run", metavar="RUN")


def print_json(doc: dict) -> None:
    click.echo(json.dumps(doc, indent=1, allow_nan=False))


def print_result(ctx: click.Context, result, *, summary: bool = True) -> None:
    """A compute result: its table or JSON document on stdout, its summary on stderr."""
    if ctx.meta.get("as_json"):
        outcome = {
            "up_to_date": result.up_to_date,
            "resumed": result.resumed,
            "solved": len(result.solved),
            "passes": result.passes,
            "seconds": round(result.seconds, 3),
        }
        print_json(document(open_run(result.path), "compute", extra={"outcome": outcome}))
    else:
        click.echo(result.table())
    if not summary:
        return
    # the outcome in one line on stderr, kept by -q: what a scheduled job's log should say
    if result.up_to_date:
        click.echo(f"{result.path} is up to date (same config and dataset); nothing to compute",
                   err=True)  # fmt: skip
    else:
        click.echo(
            f"{len(result.solved)} layers solved in {result.passes} passes, "
            f"{result.seconds:.1f} s; wrote {result.path}"
            + (" (resumed)" if result.resumed else ""),
            err=True,
        )


def provenance(model) -> str:
    """Where a run's model came from, as ``show`` prints it."""
    model = model if isinstance(model, dict) else {}
    name = model.get("class", "?")
    if model.get("source") == "caller":
        return f"{name} (given by the caller)"
    if model.get("source") == "built":
        kwargs = model.get("kwargs") or {}
        extra = f", kwargs {kwargs}" if kwargs else ""
        return f"{name} ({model.get('name')}, seed {model.get('seed')}{extra})"
    return name


def header(r) -> str:
    """The lines above ``show``'s table: where the run is, what it was made of, its verdict."""
    d = r.attrs.get("dataset", {})
    lines = [
        f"run       {r.path}",
        f"status    {r.status}",
        f"dataset   {d.get('name')} / {d.get('split')}, {d.get('count')} samples, "
        f"{d.get('fingerprint', '')[:23]}...",
        f"model     {provenance(r.attrs.get('model'))}",
        "config    " + ", ".join(f"{k}={v}" for k, v in r.config.to_dict().items()),
    ]
    record = r.attrs.get("verification")
    if isinstance(record, dict):
        off = record.get("off_target") or []
        verdict = f"OFF TARGET: {', '.join(off)}" if off else "every solved layer on target"
        lines.append(f"verified  on {record.get('split')} at tol {record.get('tol'):g}: {verdict}")
    return "\n".join(lines) + "\n"
