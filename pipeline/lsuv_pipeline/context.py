"""From options to the live objects of a run: device, data sources, model, executor.

Nothing here holds state: each function turns what the caller asked for (names, paths,
objects of their own) into what a run uses, or a clear error, before any pass starts. It
also keeps the caller's side clean: :func:`keeps_callers_rng` leaves the global random
states as it found them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import random
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .config import RunConfig
from .data import DatasetSpec, Source, limited, open_source, sampled, source_from
from .errors import ConfigError
from .executors import Executor, InlineExecutor
from .models import ModelSpec, build_model, describe_model, unwrap

__all__ = [
    "keeps_callers_rng",
    "model_for",
    "open_executor",
    "open_sources",
    "open_split",
    "recorded_config",
    "resolve_device",
]


def resolve_device(device: str | torch.device | None) -> torch.device:
    """Return ``device``; ``"auto"`` / ``None`` is CUDA when available, else the CPU.

    Raises:
        ConfigError: The device is unknown or not available here.
    """
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        dev = None
    if dev is None or dev.type not in ("cpu", "cuda"):
        raise ConfigError(f"unknown --device {str(device)!r}; use auto, cpu, cuda or cuda:N")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device {str(device)!r}: CUDA is not available here")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ConfigError(
            f"--device {str(device)!r}: only {torch.cuda.device_count()} CUDA device(s) here"
        )
    return dev


def open_split(
    config: RunConfig,
    split: str,
    *,
    root: Path,
    download: bool = True,
    data=None,
    collate=None,
    whole: bool = False,
) -> Source:
    """Open one split of the run's data: ``config.dataset`` under ``root``, or ``data``.

    ``data`` is a user's own data (see :func:`~lsuv_pipeline.data.source_from`), labelled
    ``config.dataset``, its batches kept ``whole`` for a ``forward_fn``; ``config.limit``
    applies to both, ``config.sample`` to the solve split only.
    """
    sample = config.sample if split == config.split else None  # held-out: whole
    if data is not None:
        source = source_from(data, name=config.dataset, split=split, collate=collate, whole=whole)
        return sampled(limited(source, config.limit), sample, config.sample_seed)
    spec = DatasetSpec(
        name=config.dataset,
        split=split,
        root=str(root.resolve()),  # workers may run elsewhere: they get an absolute path
        limit=config.limit,
        download=download,
        options=config.dataset_options,
        sample=sample,
        sample_seed=config.sample_seed if sample is not None else 0,
    )
    return open_source(spec)


def open_sources(
    config: RunConfig, root: Path, download: bool, data, holdout_data, collate, whole=False
) -> tuple[Source, Source | None]:
    """The solve split and, when the run measures one, the held-out split."""
    train = open_split(config, config.split, root=root, download=download, data=data,
                       collate=collate, whole=whole)  # fmt: skip
    holdout = None
    if config.verify and config.holdout is not None:
        if config.holdout == config.split:
            raise ConfigError(
                f"the held-out split must differ from the solve split {config.split!r}"
            )
        if data is None or holdout_data is not None:
            holdout = open_split(
                config,
                config.holdout,
                root=root,
                download=download,
                data=holdout_data,
                collate=collate,
                whole=whole,
            )
    return train, holdout


def recorded_config(config: RunConfig, *, model_given: bool) -> RunConfig:
    """The config as the store records it: for a model the caller gave, no model name,
    kwargs or seed (the tool built nothing), unless the seed drew the orthogonal pre-init."""
    if not model_given:
        return config
    return dataclasses.replace(
        config, model=None, model_kwargs={}, seed=config.seed if config.orthogonal else None
    )


def model_for(config: RunConfig, model: nn.Module | None, source: Source):
    """The run's model and its provenance: the caller's, or ``config.model`` built with
    ``config.seed`` for the data's channels and classes.

    A caller's model wrapped in ``DataParallel`` / ``DistributedDataParallel`` or
    ``torch.compile`` is unwrapped (``models.unwrap``): the run solves, names and stores the
    inner module's layers, which the wrapper shares.

    Returns:
        ``(model, provenance)``: provenance is ``models.describe_model`` plus how the model
        was made (``"caller"``, or ``"built"`` with its name, kwargs and seed).

    Raises:
        ModelError: Not an ``nn.Module``, or it cannot be built.
        ConfigError: No model given and none named.
    """
    if model is not None:
        model = unwrap(model)
        return model, {**describe_model(model), "source": "caller"}
    if config.model is None:
        raise ConfigError("no model: give RunConfig(model=...) or compute(..., model=...)")
    model = build_model(
        ModelSpec(name=config.model, kwargs=config.model_kwargs),
        seed=config.seed,
        in_channels=source.sample_shape[0],
        num_classes=source.num_classes or 10,
    )
    built = {
        "source": "built",
        "name": config.model,
        "kwargs": dict(config.model_kwargs),
        "seed": config.seed,
    }
    return model, {**describe_model(model), **built}


@contextlib.contextmanager
def open_executor(
    *,
    workers: int | None = None,
    scheduler: str | None = None,
    scheduler_file: str | None = None,
    device_type: str = "cpu",
    timeout: float = 20.0,
    allow_mixed: bool = False,
) -> Iterator[Executor]:
    """Yield the executor the options ask for; shut down only what it started.

    Args:
        workers: Start a local cluster of this many worker processes.
        scheduler: Address of a running dask scheduler (``tcp://host:8786``).
        scheduler_file: A scheduler file written by ``dask scheduler --scheduler-file``.
        device_type: ``"cpu"`` or ``"cuda"``: the device each worker computes on.
        timeout: Seconds to wait for an existing scheduler.
        allow_mixed: Accept dask workers whose numerics fingerprints differ.

    Raises:
        ConfigError: More than one of the three options.
        ExecutorError: The scheduler cannot be reached.
    """
    chosen = [x for x in (workers, scheduler, scheduler_file) if x is not None]
    if len(chosen) > 1:
        raise ConfigError("use only one of --workers, --scheduler and --scheduler-file")
    if not chosen:
        yield InlineExecutor()
        return
    # imported here, not above: an inline run never loads distributed (half a second,
    # and its config and loggers) for nothing
    from .cluster import connect, quiet_dask_logs

    with quiet_dask_logs():
        executor = connect(workers, scheduler, scheduler_file, device_type, timeout, allow_mixed)
        try:
            yield executor
        finally:
            executor.close()


def keeps_callers_rng(fn):
    """Run ``fn`` leaving the global torch (CPU, and CUDA where initialized), NumPy and
    Python RNG states exactly as it found them.

    Each iteration of a ``DataLoader`` draws its base seed from the global torch RNG, so a
    pass over a caller's loader would otherwise make a training script train differently
    depending on whether the store already existed.
    """

    @functools.wraps(fn)
    def wrapped(*args, **kwargs):
        python, numpy_state = random.getstate(), np.random.get_state()
        cuda = list(range(torch.cuda.device_count())) if torch.cuda.is_initialized() else []
        try:
            with torch.random.fork_rng(devices=cuda):
                return fn(*args, **kwargs)
        finally:
            random.setstate(python)
            np.random.set_state(numpy_state)

    return wrapped
