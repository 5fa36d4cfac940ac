"""The ``lsuv-pipeline`` command line: parse options, call one library function, print.

Every user mistake ends as one line ``Error: ...`` on stderr and a non-zero exit; a
traceback means a bug.
"""

from __future__ import annotations

import json
import logging
import sys

import click

from .checkpoint import export as export_state
from .checkpoint import open_run
from .config import RunConfig
from .data import DATASETS, ROOT_ENV
from .errors import Interrupted, LsuvError, OffTarget
from .progress import TqdmProgress
from .run import compute as run_compute
from .solve import MODES
from .verify import verify as run_verify

__all__ = ["OFF_TARGET", "cli", "main"]

#: Exit status of a run or verification whose layers miss the tolerance (1 is any other
#: error, 2 a usage mistake, 130 Ctrl-C).
OFF_TARGET = 3


class _Group(click.Group):
    """A group that reports every error as one line, without a usage banner or traceback."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        try:
            code = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except click.exceptions.Abort:
            click.echo("Aborted.", err=True)
            sys.exit(130)
        except click.ClickException as exc:
            hint = ""
            if isinstance(exc, click.UsageError) and exc.ctx is not None:
                hint = f" (see '{exc.ctx.command_path} --help')"
            click.echo(f"Error: {exc.format_message()}{hint}", err=True)
            sys.exit(exc.exit_code)
        sys.exit(code if isinstance(code, int) else 0)

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except OffTarget as exc:
            if exc.result is not None:
                click.echo(exc.result.table())
            click.echo(f"Error: {exc}", err=True)
            ctx.exit(OFF_TARGET)
        except Interrupted as exc:
            click.echo(f"Interrupted: {exc}", err=True)
            ctx.exit(130)
        except LsuvError as exc:
            raise click.ClickException(str(exc)) from None


DATA_ROOT = click.option(
    "--data-root",
    type=click.Path(file_okay=False),
    envvar=ROOT_ENV,
    show_envvar=True,
    help="Folder holding the datasets in torchvision's layout [default: data/].",
)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="lsuv-pipeline")
def cli() -> None:
    """Exact, full-dataset LSUV initialization (Mishkin & Matas 2015), stored in Zarr."""


@cli.command()
@click.option(
    "--dataset",
    default="mnist",
    show_default=True,
    help="Dataset to solve on: "
    + ", ".join(sorted(k + ":PATH" if k == "imagefolder" else k for k in DATASETS))
    + ".",
)
@click.option(
    "--data-option",
    "data_options",
    multiple=True,
    metavar="KEY=VALUE",
    help="A dataset option, VALUE as JSON or plain text (resize=32, crop=224, "
    "normalize=compute, 'mean=[0.5]'); repeatable.",
)
@click.option(
    "--model",
    default="mj",
    show_default=True,
    help="mj, a torchvision classification model (resnet18, vgg11_bn, ...), or "
    "package.module:factory.",
)
@click.option(
    "--model-kwargs",
    default="{}",
    metavar="JSON",
    help="Keyword arguments for the model factory, as a JSON object (e.g. '{\"width\": 2}').",
)
@click.option(
    "--include",
    multiple=True,
    metavar="REGEX",
    help="Solve only layers whose name matches (re.search); repeatable.",
)
@click.option(
    "--exclude", multiple=True, metavar="REGEX", help="Leave out matching layers; repeatable."
)
@DATA_ROOT
@click.option(
    "--out",
    type=click.Path(dir_okay=True, file_okay=False),
    help="Run store to write [default: data/runs/<dataset>-<model>-<mode>.zarr].",
)
@click.option("--split", default="train", show_default=True, help="Split to solve on.")
@click.option(
    "--holdout",
    default="test",
    show_default=True,
    help="Split measured after the solve; 'none' for none.",
)
@click.option(
    "--limit", type=click.IntRange(min=1), help="Use only the first N samples of each split."
)
@click.option(
    "--mode",
    type=click.Choice(MODES),
    default="tensor",
    show_default=True,
    help="One scale per layer (the paper's) or one per output channel.",
)
@click.option("--target-std", type=float, default=1.0, show_default=True, help="Output std.")
@click.option(
    "--tol",
    type=float,
    default=1e-4,
    show_default=True,
    help="Tolerance on |mean| and |std - target| for layers solved iteratively.",
)
@click.option(
    "--max-iter",
    type=click.IntRange(min=1),
    default=20,
    show_default=True,
    help="Most passes for one iteratively solved layer.",
)
@click.option("--orthogonal", is_flag=True, help="Orthonormal pre-init first (LSUV step I).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the initial weights.")
@click.option(
    "--batch-size",
    type=click.IntRange(min=1),
    default=256,
    show_default=True,
    help="Samples per forward (shards are read in batches of this size).",
)
@click.option(
    "--shard-size",
    type=click.IntRange(min=1),
    default=4096,
    show_default=True,
    help="Samples per shard: the unit of work and of resume.",
)
@click.option(
    "--device",
    default="auto",
    show_default=True,
    help="auto (CUDA if available), cpu, cuda[:N]; on a cluster, what each worker uses.",
)
@click.option(
    "--workers",
    type=click.IntRange(min=1),
    help="Start a local dask cluster of N worker processes (one per GPU with --device cuda).",
)
@click.option("--scheduler", metavar="ADDRESS", help="Use the dask cluster at this address.")
@click.option(
    "--scheduler-file",
    type=click.Path(dir_okay=False),
    help="Use the dask cluster described by this scheduler file.",
)
@click.option(
    "--scheduler-timeout",
    type=click.FloatRange(min=0, min_open=True),
    default=20.0,
    show_default=True,
    help="Seconds to wait for an existing scheduler and its first worker.",
)
@click.option("--allow-tf32", is_flag=True, help="Let CUDA use TF32 (faster, less reproducible).")
@click.option(
    "--allow-mixed-hardware",
    is_flag=True,
    help="Let dask workers of different hardware or library builds share a run, or finish "
    "a run started elsewhere; recorded in the store, whose bytes then depend on who "
    "computed which shard.",
)
@click.option(
    "--cache/--no-cache",
    default=True,
    show_default=True,
    help="Keep activations between passes so each pass computes only the new layer (same results).",
)
@click.option(
    "--cache-memory",
    default="auto",
    show_default=True,
    metavar="SIZE",
    help="Budget of the activation cache per process (4GB is 4e9 bytes, 4GiB 4 << 30; "
    "auto: half the free memory of the device). Shards past it are recomputed from the input.",
)
@click.option(
    "--verify/--no-verify",
    default=True,
    show_default=True,
    help="Measure every layer before and after LSUV on the splits.",
)
@click.option(
    "--download/--no-download", default=True, show_default=True, help="Fetch a missing dataset."
)
@click.option(
    "--overwrite",
    is_flag=True,
    help="Replace an existing run store of another config or dataset.",
)
@click.option("-q", "--quiet", is_flag=True, help="No progress bars (notes and warnings stay).")
def compute(**opts) -> None:
    """Compute the LSUV init over a whole dataset and write it to a Zarr run store.

    Rerunning the same command resumes an interrupted run, or does nothing if the store is
    complete and up to date.
    """
    holdout = None if opts["holdout"].lower() == "none" else opts["holdout"]
    model_kwargs = _json_object(opts["model_kwargs"], "--model-kwargs")
    config = RunConfig(
        dataset=opts["dataset"],
        dataset_options=_key_values(opts["data_options"], "--data-option"),
        split=opts["split"],
        holdout=holdout,
        limit=opts["limit"],
        model=opts["model"],
        model_kwargs=model_kwargs,
        include=opts["include"],
        exclude=opts["exclude"],
        mode=opts["mode"],
        target_std=opts["target_std"],
        tol=opts["tol"],
        max_iter=opts["max_iter"],
        orthogonal=opts["orthogonal"],
        seed=opts["seed"],
        batch_size=opts["batch_size"],
        shard_size=opts["shard_size"],
        verify=opts["verify"],
    )
    out = opts["out"] or f"data/runs/{config.dataset}-{config.model}-{config.mode}.zarr"
    result = run_compute(
        config,
        out,
        data_root=opts["data_root"],
        download=opts["download"],
        device=opts["device"],
        workers=opts["workers"],
        scheduler=opts["scheduler"],
        scheduler_file=opts["scheduler_file"],
        scheduler_timeout=opts["scheduler_timeout"],
        allow_tf32=opts["allow_tf32"],
        allow_mixed_hardware=opts["allow_mixed_hardware"],
        cache=opts["cache"],
        cache_memory=opts["cache_memory"],
        progress=TqdmProgress(bars=not opts["quiet"]),
        overwrite=opts["overwrite"],
    )
    if result.up_to_date:
        click.echo(f"{result.path} is up to date (same config and dataset); nothing to compute")
        click.echo(result.table())
        return
    click.echo(result.table())
    click.echo(
        f"\n{len(result.solved)} layers solved in {result.passes} passes, "
        f"{result.seconds:.1f} s; wrote {result.path}" + (" (resumed)" if result.resumed else "")
    )


def _json_object(text: str, option: str) -> dict:
    try:
        value = json.loads(text)
    except ValueError as exc:
        raise click.BadParameter(f"not JSON: {exc}", param_hint=option) from None
    if not isinstance(value, dict):
        raise click.BadParameter("must be a JSON object", param_hint=option)
    return value


def _key_values(items: tuple[str, ...], option: str) -> dict:
    out = {}
    for item in items:
        key, eq, text = item.partition("=")
        if not eq or not key.strip():
            raise click.BadParameter(f"expected KEY=VALUE, got {item!r}", param_hint=option)
        try:
            out[key.strip()] = json.loads(text)
        except ValueError:
            out[key.strip()] = text  # plain text: normalize=compute
    return out


RUN = click.argument("run", metavar="RUN")


def _provenance(model) -> str:
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


@cli.command()
@RUN
@click.option(
    "--plot",
    type=click.Path(dir_okay=False),
    help="Also draw per-layer mean and std, before and after, to this PNG.",
)
def show(run: str, plot: str | None) -> None:
    """Print a run's config, status and per-layer statistics.

    RUN is a run store path or the name of a shipped checkpoint (mnist-mj).
    """
    r = open_run(run)
    d = r.attrs.get("dataset", {})
    click.echo(f"run       {r.path}")
    click.echo(f"status    {r.status}")
    click.echo(
        f"dataset   {d.get('name')} / {d.get('split')}, {d.get('count')} samples, "
        f"{d.get('fingerprint', '')[:23]}..."
    )
    click.echo(f"model     {_provenance(r.attrs.get('model'))}")
    cfg = r.config.to_dict()
    click.echo("config    " + ", ".join(f"{k}={v}" for k, v in cfg.items()))
    record = r.attrs.get("verification")
    if isinstance(record, dict):
        off = record.get("off_target") or []
        verdict = f"OFF TARGET: {', '.join(off)}" if off else "every solved layer on target"
        click.echo(f"verified  on {record.get('split')} at tol {record.get('tol'):g}: {verdict}")
    click.echo("")
    click.echo(r.table())
    if plot:
        click.echo(f"\nwrote {r.plot(plot)}")


@cli.command()
@RUN
@click.option(
    "--split", default="train", show_default=True, help="Split to measure (train or test)."
)
@click.option(
    "--tol",
    type=click.FloatRange(min=0, min_open=True),
    default=1e-4,
    show_default=True,
    help="Largest |mean| and |std - target| accepted per layer.",
)
@DATA_ROOT
@click.option(
    "--device",
    default="auto",
    show_default=True,
    help="auto (CUDA if available), cpu, cuda[:N]: where to measure.",
)
@click.option("-q", "--quiet", is_flag=True, help="No progress bar.")
def verify(run: str, split: str, tol: float, data_root, device: str, quiet: bool) -> None:
    """Measure every layer's output mean/std over a split with the run's final weights.

    Exits 3 if any layer misses the tolerance.
    """
    result = run_verify(
        run, split=split, tol=tol, data_root=data_root, device=device, progress=not quiet
    )
    click.echo(result.table())
    if result.failures:
        click.echo(
            f"\n{len(result.failures)} layer(s) miss tol {tol:g} on {split}: "
            + ", ".join(result.failures),
            err=True,
        )
        raise click.exceptions.Exit(OFF_TARGET)
    click.echo(f"\nall {len(result.layers)} layers within {tol:g} on {split}")


@cli.command()
@RUN
@click.option(
    "--out",
    required=True,
    type=click.Path(dir_okay=False),
    help="File to write (a torch state dict).",
)
def export(run: str, out: str) -> None:
    """Write a finished run's weights as a state dict for torch.load(..., weights_only=True)."""
    path = export_state(run, out)
    click.echo(f"wrote {path}")


def main() -> None:
    """Console-script entry point."""
    # This process reports cluster failures itself, once; dask's threads may still log
    # after a run ended (a client reconnecting to a scheduler that is gone).
    logging.getLogger("distributed").addFilter(lambda record: False)
    for name in ("distributed.client", "distributed.comm", "distributed.core"):
        logging.getLogger(name).addFilter(lambda record: False)
    cli()
