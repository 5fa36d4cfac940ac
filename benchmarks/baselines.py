"""The inits compared, each a function ``init(model, source, *, seed, work) -> model``.

Two of them are reference implementations written here, for comparison only:

* :func:`seed_lsuv_` -- the one-batch LSUV of the seed write-up: hooks on each conv /
  linear layer, per layer forward one batch, read the output's std and mean with
  ``.item()``, divide the weight by the std and subtract the mean from the bias, until
  |std - 1| < 0.1 or 10 iterations.
* :func:`naive_full_` -- the straightforward full-dataset solve: per layer, run the WHOLE
  model over every batch of the training split with a hook that adds the output's sum and
  sum of squares to Python floats with ``.item()`` per batch, then rescale once (tensor
  mode, no iteration, no early exit). Same answer as ours in tensor mode up to rounding;
  it is here for its cost.

``lsuv`` is the PyPI package (``lsuv_with_singlebatch``: orthonormal pre-init, then
iterate on one batch; its defaults). ``ours-*`` is :func:`lsuv_pipeline.compute`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from lsuv_pipeline import RunConfig, compute
from lsuv_pipeline.data import Source

from .common import one_batch

TARGETS = (nn.Conv2d, nn.Linear)


def _targets(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, TARGETS)]


def default_(model: nn.Module, src: Source, *, seed: int, work: Path) -> nn.Module:
    """PyTorch's default init, as built: nothing to do."""
    return model


@torch.no_grad()
def kaiming_(model: nn.Module, src: Source, *, seed: int, work: Path) -> nn.Module:
    """He et al. 2015: normal, fan-in, ReLU gain; biases 0."""
    g = torch.Generator().manual_seed(seed)
    for m in _targets(model):
        nn.init.kaiming_normal_(m.weight, nonlinearity="relu", generator=g)
        nn.init.zeros_(m.bias)
    return model


@torch.no_grad()
def orthogonal_(model: nn.Module, src: Source, *, seed: int, work: Path) -> nn.Module:
    """Saxe et al. 2014: orthogonal weights, gain 1 (``nn.init.orthogonal_``); biases 0."""
    g = torch.Generator().manual_seed(seed)
    for m in _targets(model):
        nn.init.orthogonal_(m.weight, generator=g)
        nn.init.zeros_(m.bias)
    return model


def pypi_lsuv(batch_size: int) -> Callable[..., nn.Module]:
    """The PyPI package ``lsuv`` on one random batch of ``batch_size`` training samples."""

    def init(model: nn.Module, src: Source, *, seed: int, work: Path) -> nn.Module:
        from lsuv import lsuv_with_singlebatch

        batch = one_batch(src, batch_size, seed)
        torch.manual_seed(seed)  # its orthonormal pre-init draws from the global RNG
        return lsuv_with_singlebatch(model, batch, verbose=False, device=torch.device("cpu"))

    return init


@torch.no_grad()
def seed_lsuv_(
    model: nn.Module,
    batch: torch.Tensor,
    *,
    target_std: float = 1.0,
    tol: float = 0.1,
    max_iter: int = 10,
) -> nn.Module:
    """One-batch LSUV as in the seed write-up (reference implementation, see module doc)."""
    model.eval()
    for layer in _targets(model):  # registration order; the forward order for MJ
        seen = {}

        def hook(module, inputs, output, seen=seen):
            seen["mean"], seen["std"] = output.mean().item(), output.std().item()

        handle = layer.register_forward_hook(hook)
        try:
            for _ in range(max_iter):
                model(batch)
                if abs(seen["std"] - target_std) < tol:
                    break
                layer.weight.div_(seen["std"] / target_std)
                layer.bias.sub_(seen["mean"])
        finally:
            handle.remove()
    return model


def seed_lsuv(batch_size: int) -> Callable[..., nn.Module]:
    """:func:`seed_lsuv_` on one random batch of ``batch_size`` training samples."""

    def init(model: nn.Module, src: Source, *, seed: int, work: Path) -> nn.Module:
        return seed_lsuv_(model, one_batch(src, batch_size, seed))

    return init


@torch.no_grad()
def naive_full_(
    model: nn.Module, src: Source, *, batch_size: int = 256, target_std: float = 1.0
) -> nn.Module:
    """Full-dataset LSUV the naive way (reference implementation, see module doc)."""
    model.eval()
    for layer in _targets(model):
        acc = {"n": 0, "sum": 0.0, "sumsq": 0.0}

        def hook(module, inputs, output, acc=acc):
            acc["n"] += output.numel()
            acc["sum"] += output.sum().item()
            acc["sumsq"] += output.square().sum().item()

        handle = layer.register_forward_hook(hook)
        try:
            for start in range(0, src.count, batch_size):
                model(src.batch(start, min(start + batch_size, src.count)))
        finally:
            handle.remove()
        mean = acc["sum"] / acc["n"]
        std = (acc["sumsq"] / acc["n"] - mean**2) ** 0.5 / target_std
        layer.weight.div_(std)
        layer.bias.sub_(mean).div_(std)
    return model


def naive_full(model: nn.Module, src: Source, *, seed: int, work: Path) -> nn.Module:
    return naive_full_(model, src)


def ours(mode: str, samples: int | None = None) -> Callable[..., nn.Module]:
    """lsuv-pipeline's exact solve over the whole training split ``src``, or over
    ``samples`` of its samples drawn uniformly without replacement under the run's seed.

    The store goes to ``work`` (replaced if a store of the same name is there).
    """

    def init(model: nn.Module, src: Source, *, seed: int, work: Path) -> nn.Module:
        config = RunConfig(dataset=src.name, mode=mode, verify=False, seed=seed,
                           sample=samples, sample_seed=seed)  # fmt: skip
        size = src.count if samples is None else f"{samples}of{src.count}"
        out = work / f"ours-{mode}-{src.name}-{size}-seed{seed}.zarr"
        compute(config, out, model=model, data=src, device="cpu", overwrite=True)
        return model

    return init


@dataclass(frozen=True)
class Init:
    """An init as the tables name it."""

    label: str
    init: Callable[..., nn.Module]


#: Every init of the quality and training sections, in table order.
INITS: dict[str, Init] = {
    "default": Init("PyTorch default", default_),
    "kaiming": Init("kaiming normal (fan-in, ReLU), bias 0", kaiming_),
    "orthogonal": Init("orthogonal (gain 1), bias 0", orthogonal_),
    "pypi-lsuv-64": Init("PyPI lsuv 0.3.0, one batch of 64", pypi_lsuv(64)),
    "pypi-lsuv-256": Init("PyPI lsuv 0.3.0, one batch of 256", pypi_lsuv(256)),
    "pypi-lsuv-1024": Init("PyPI lsuv 0.3.0, one batch of 1024", pypi_lsuv(1024)),
    "seed-lsuv-256": Init("one-batch LSUV, seed write-up (batch 256)", seed_lsuv(256)),
    "ours-tensor": Init("ours, tensor mode (full training split)", ours("tensor")),
    "ours-channel": Init("ours, channel mode (full training split)", ours("channel")),
}


def initialize(name: str, src: Source, *, seed: int, work: Path) -> nn.Module:
    """Build MJ with PyTorch's default init under ``seed``, then apply init ``name``."""
    from lsuv_pipeline.models import mj

    torch.manual_seed(seed)
    model = mj(in_channels=src.sample_shape[0], num_classes=src.num_classes or 10)
    return INITS[name].init(model, src, seed=seed, work=work)
