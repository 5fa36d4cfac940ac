"""``lsuv-pipeline compute``: solve a run and write its store."""

from __future__ import annotations

import json

import click

from ..config import RunConfig
from ..data import DATASETS
from ..progress import Progress, TqdmProgress
from ..ranks import launched
from ..run import compute as run_compute
from ..solve import MODES
from .common import DATA_ROOT, JSON, QUIET, print_result, set_output

__all__ = ["compute"]


@click.command()
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
    help="mj, a torchvision classification model (resnet18, vgg11_bn, ...), a timm model "
    "(timm:resnet50, ...; pip install timm), or package.module:factory.",
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
    "--limit",
    type=click.IntRange(min=1),
    help="Use only the first N samples of each split, in dataset order.",
)
@click.option(
    "--sample",
    type=click.IntRange(min=1),
    help="Solve on N samples of the solve split drawn at random without replacement "
    "(the held-out split stays whole).",
)
@click.option(
    "--sample-seed",
    type=int,
    default=0,
    show_default=True,
    help="Seed of the --sample draw (recorded in the store).",
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
    default=None,
    help="Tolerance on |mean| and |std - target| for layers solved iteratively, and the one "
    "verification judges by [default: 1e-4; 1e-2 for a bfloat16 model, 1e-3 for float16].",
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
@click.option(
    "--loader-workers",
    type=click.IntRange(min=0),
    help="Threads that decode the data and read the next batches while one computes "
    "(0: none; default: the cores available, at most 8). Same results for any number.",
)
@click.option(
    "--compile",
    "compile_",
    is_flag=True,
    help="Reduce conv outputs with a kernel built by torch.compile (needs a C++ compiler): "
    "one read instead of two; the same accuracy, other bits (part of the run's identity).",
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
@QUIET
@JSON
def compute(**opts) -> None:
    """Compute the LSUV init over a whole dataset and write it to a Zarr run store.

    Rerunning the same command resumes an interrupted run, or does nothing if the store is
    complete and up to date. Under torchrun (torchrun --nproc-per-node N -m lsuv_pipeline
    compute ...) the ranks split the shards and rank 0 writes the store.
    """
    set_output(click.get_current_context(), quiet=opts["quiet"], as_json=opts["as_json"])
    holdout = None if opts["holdout"].lower() == "none" else opts["holdout"]
    model_kwargs = _json_object(opts["model_kwargs"], "--model-kwargs")
    config = RunConfig(
        dataset=opts["dataset"],
        dataset_options=_key_values(opts["data_options"], "--data-option"),
        split=opts["split"],
        holdout=holdout,
        limit=opts["limit"],
        sample=opts["sample"],
        sample_seed=opts["sample_seed"],
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
        compile=opts["compile_"],
    )
    out = opts["out"] or f"data/runs/{config.dataset}-{config.model}-{config.mode}.zarr"
    with launched(opts["device"]) as ranks:  # under torchrun: every rank a share
        main = ranks is None or ranks.main
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
            progress=TqdmProgress(bars=not opts["quiet"], notes=not opts["quiet"])
            if main
            else Progress(),
            overwrite=opts["overwrite"],
            loader_workers=opts["loader_workers"],
        )
        if main:  # the other ranks computed the same; rank 0 wrote and reports it
            print_result(click.get_current_context(), result)


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
