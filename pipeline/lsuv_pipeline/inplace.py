"""LSUV from a training script: one call, in memory, on the loader the script already has.

::

    model = lsuv_pipeline.lsuv_(model, train_loader)   # then train as usual

:func:`lsuv_` is :func:`~lsuv_pipeline.compute` with the defaults of a training script: the
store lives in a temporary folder removed on return (nothing is written unless ``store=``
is given), there are no verification passes unless asked, progress bars show when stderr
is a terminal or a notebook, and a shuffling ``DataLoader`` is read in a fixed order
(:func:`fixed_order`): its dataset, through its own ``collate_fn``, batch size and
workers, never in its sampler's random order, so the result does not depend on the
shuffle and neither the loader's generator nor the global RNG moves.

In a ``torch.distributed`` job, call it on every rank with the same data: the ranks split
the shards among themselves and every rank gets the same weights (``ranks.py``). A
loader's ``DistributedSampler`` is read in full: the tool, not the sampler, splits.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler, IterableDataset

from .batches import ForwardFn, MaskFn
from .config import RunConfig
from .context import keeps_callers_rng
from .data.user import shuffles
from .errors import ConfigError
from .progress import Progress
from .run import compute
from .solve import Mode
from .zarrio import scratch_folder

__all__ = ["fixed_order", "lsuv_"]


@keeps_callers_rng
def lsuv_(
    model: nn.Module,
    data,
    *,
    forward_fn: ForwardFn | None = None,
    mask_fn: MaskFn | None = None,
    collate=None,
    samples: int | None = None,
    sample_seed: int = 0,
    mode: Mode = "tensor",
    target_std: float = 1.0,
    tol: float | None = None,
    device: str | torch.device | None = None,
    store: str | Path | None = None,
    verify: bool = False,
    progress: Progress | bool | str = "auto",
    name: str = "data",
    distributed: bool | None = None,
    loader_workers: int | None = None,
    compile: bool = False,
) -> nn.Module:
    """Initialize ``model`` in place with exact LSUV over all of ``data``; return it.

    Every conv / linear layer and attention projection, first to last, gets output mean 0
    and std ``target_std`` over the whole of ``data`` (one pass per layer), exactly as
    :func:`~lsuv_pipeline.compute` solves it; layers it cannot solve are named in a note.

    Args:
        model: The model; its weights are changed in place.
        data: A ``DataLoader`` (shuffling or not: see :func:`fixed_order`), a map-style
            ``Dataset`` or a re-iterable collection of batches (``data.source_from``).
        forward_fn, mask_fn, collate: As for ``compute`` (``batches.py``).
        samples: Solve over this many items of ``data`` drawn uniformly without
            replacement under ``sample_seed`` (default: all of it).
        sample_seed: The seed of that draw.
        mode: ``"tensor"`` (one scale per layer, the paper's) or ``"channel"``.
        target_std: The output std to reach.
        tol: The tolerance ``verify`` judges by (default: by the model's dtype).
        device: Where to run (default: where the model's parameters are).
        store: A run store to write, resume and reuse (up to date: no pass at all);
            default none: a temporary one, removed on return.
        verify: Measure every layer again with the final weights; an off-target layer
            then raises :class:`~lsuv_pipeline.OffTarget`.
        progress: ``"auto"``: bars when stderr is a terminal or a notebook; ``True``,
            ``False``, or a :class:`~lsuv_pipeline.progress.Progress`.
        name: The data's name in the store and in messages.
        distributed: In an initialized ``torch.distributed`` group of several ranks, call
            ``lsuv_`` on every rank: they split the work and all get the same weights;
            only rank 0 writes ``store``. ``None``: so whenever such a group exists;
            ``False``: this process alone (e.g. one rank initializing, then broadcasting).
        loader_workers: As for ``compute``: threads that load the batches (0: none).
        compile: Reduce conv outputs with the compiled kernel (``RunConfig.compile``).

    Returns:
        ``model``, initialized.

    Raises:
        LsuvError: Bad data or model, a layer that cannot be solved, data that changes
            between passes (random augmentation), or an off-target layer with ``verify``.
    """
    if not isinstance(model, nn.Module):
        raise ConfigError(f"lsuv_ takes a torch.nn.Module, got {type(model).__name__}")
    config = RunConfig(dataset=name, mode=mode, target_std=target_std, tol=tol, verify=verify,
                       holdout=None, sample=samples, sample_seed=sample_seed,
                       compile=compile)  # fmt: skip
    options = dict(model=model, data=fixed_order(data), collate=collate, forward_fn=forward_fn,
                   mask_fn=mask_fn, device=device if device is not None else _device_of(model),
                   progress=_progress(progress), distributed=distributed,
                   loader_workers=loader_workers)  # fmt: skip
    if store is not None:
        compute(config, store, **options)
        return model
    with scratch_folder("lsuv-") as tmp:
        compute(config, tmp / "run.zarr", **options)
    return model


def fixed_order(data):
    """``data`` as a loader that reads it in a fixed order.

    A ``DataLoader`` whose sampler shuffles, or reads one rank's part (a
    ``DistributedSampler``), is replaced by one over the whole dataset, in index order,
    with its ``collate_fn``, batch size, workers and worker init, and a generator of its
    own (the loader's and the global one are not used). Anything else is returned as it
    is.
    """
    if not isinstance(data, DataLoader) or isinstance(data.dataset, IterableDataset):
        return data
    if not shuffles(data) and not _one_ranks_part(data):
        return data
    if data.batch_size is None:
        raise ConfigError(
            "the DataLoader shuffles through a batch_sampler of its own; pass its dataset "
            "(with collate=) or a DataLoader with batch_size= instead"
        )
    return DataLoader(
        data.dataset,
        batch_size=data.batch_size,
        shuffle=False,
        collate_fn=data.collate_fn,
        num_workers=data.num_workers,
        worker_init_fn=data.worker_init_fn,
        multiprocessing_context=data.multiprocessing_context if data.num_workers else None,
        persistent_workers=data.persistent_workers,
        generator=torch.Generator().manual_seed(0),
    )


def _one_ranks_part(loader: DataLoader) -> bool:
    samplers = [loader.sampler, getattr(loader.batch_sampler, "sampler", None)]
    return any(isinstance(s, DistributedSampler) for s in samplers)


def _device_of(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def _progress(progress: Progress | bool | str) -> Progress | bool:
    if progress != "auto":
        return progress
    return sys.stderr.isatty() or "ipykernel" in sys.modules
