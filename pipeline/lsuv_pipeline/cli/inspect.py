"""``show``, ``verify`` and ``export``: read a finished run."""

from __future__ import annotations

import click

from ..checkpoint import export as export_state
from ..checkpoint import export_bytes, open_run
from ..document import document
from ..verify import verify as run_verify
from .common import (
    DATA_ROOT,
    JSON,
    OFF_TARGET,
    QUIET,
    RUN,
    header,
    note,
    print_json,
    set_output,
)

__all__ = ["export", "show", "verify"]


@click.command()
@RUN
@click.option(
    "--plot",
    type=click.Path(dir_okay=False),
    help="Also draw per-layer mean, std and residuals to this file (.png, .svg or .pdf).",
)
@click.option(
    "--report",
    type=click.Path(file_okay=False),
    help="Also write a self-contained HTML page of the run into this folder.",
)
@click.option(
    "--convergence",
    type=click.Path(dir_okay=False),
    help="Draw how far each layer's running estimate was from the full split's after each "
    "shard to this file (.png, .svg or .pdf), and print per layer the samples after which "
    "it stayed within 1e-3 and 1e-4 (instead of the statistics table).",
)
@JSON
@QUIET
def show(run: str, plot: str | None, report: str | None, convergence: str | None,
         as_json: bool, quiet: bool) -> None:  # fmt: skip
    """Print a run's config, status and per-layer statistics.

    RUN is a run store path or the name of a shipped checkpoint (mnist-mj). Files asked
    for (--plot, --report, --convergence) are written before anything is printed.
    """
    set_output(click.get_current_context(), quiet=quiet, as_json=as_json)
    r = open_run(run)
    needed = r.running_table() if convergence else None  # no record: an error, before any write
    written = [r.plot(plot)] if plot else []
    if report:
        written.append(r.report(report))
    if convergence:
        written.append(r.plot_running(convergence))
    if as_json:
        print_json(document(r, "show"))
    else:
        click.echo(header(r))
        click.echo(needed or r.table())
    for path in written:
        note(f"wrote {path}")


@click.command()
@RUN
@click.option(
    "--split", default="train", show_default=True, help="Split to measure (train or test)."
)
@click.option(
    "--tol",
    type=click.FloatRange(min=0, min_open=True),
    help="Largest |mean| and |std - target| accepted per layer on the split the run solved "
    "[default: the run's own tolerance].",
)
@click.option(
    "--holdout-tol",
    type=click.FloatRange(min=0, min_open=True),
    help="Judge another split (held out) at this tolerance too [default: report it only].",
)
@DATA_ROOT
@click.option(
    "--device",
    default="auto",
    show_default=True,
    help="auto (CUDA if available), cpu, cuda[:N]: where to measure.",
)
@JSON
@QUIET
def verify(run: str, split: str, tol: float | None, holdout_tol: float | None, data_root,
           device: str, as_json: bool, quiet: bool) -> None:  # fmt: skip
    """Check every array of a run, and measure every layer's output mean/std over a split
    with the run's final weights.

    On the split the run solved, each layer must be within --tol, by default the run's own
    (exit 3 if not). Another split (held out) is reported, not judged, unless --holdout-tol
    is given: its layers are near the target, not at it, by how much the split differs.
    """
    set_output(click.get_current_context(), quiet=quiet, as_json=as_json)
    result = run_verify(run, split=split, tol=tol, holdout_tol=holdout_tol,
                        data_root=data_root, device=device, progress=not quiet)  # fmt: skip
    if as_json:
        summary = {"split": split, "tol": result.tol, "failures": result.failures}
        print_json(document(open_run(run), "verify", rows=result.layers,
                             judged=result.judged, extra={"verify": summary}))  # fmt: skip
    else:
        click.echo(result.table())
    if result.failures:
        click.echo(
            f"\n{len(result.failures)} layer(s) miss tol {result.tol:g} on {split}: "
            + ", ".join(result.failures),
            err=True,
        )
        raise click.exceptions.Exit(OFF_TARGET)
    if result.tol is None:
        click.echo(f"\n{split} is held out: measured, not judged (--holdout-tol judges it)",
                   err=True)  # fmt: skip
    else:
        click.echo(f"\nall {len(result.layers)} layers within {result.tol:g} on {split}", err=True)


@click.command()
@RUN
@click.option(
    "--out",
    required=True,
    type=click.Path(dir_okay=False, allow_dash=True),
    help="File to write (a torch state dict); '-' for stdout.",
)
@QUIET
def export(run: str, out: str, quiet: bool) -> None:
    """Write a finished run's weights as a state dict for torch.load(..., weights_only=True)."""
    set_output(click.get_current_context(), quiet=quiet)
    if out == "-":
        data = export_bytes(run)
        click.get_binary_stream("stdout").write(data)
        return
    path = export_state(run, out)
    note(f"wrote {path}")
