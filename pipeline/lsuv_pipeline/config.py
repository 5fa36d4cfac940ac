"""The configuration of a run: everything that determines its numbers, and nothing else.

Where and how a run executes (data root, device, workers, progress) is not part of it: the
same config gives the same store inline or on a cluster.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from dataclasses import dataclass, field

import torch

from .errors import ConfigError
from .solve import MODES, Mode

__all__ = ["DEFAULT_TOL", "HALF_TOL", "RunConfig", "with_default_tol"]

#: The tolerance of a run that names none, for a model in float32 or float64.
DEFAULT_TOL = 1e-4
#: ... and for a half-precision model: what its rounding can reach. bfloat16 keeps 8
#: significant bits, so one rounding of a weight or a bias is off by up to 2^-9 (2e-3) of
#: it, and a solved layer lands within a few 1e-3 of its target (MNIST, 512 samples:
#: |mean| 2.4e-3, |std - 1| 2.0e-3); float16 keeps 11 bits, eight times finer.
HALF_TOL = {torch.bfloat16: 1e-2, torch.float16: 1e-3}


@dataclass(frozen=True, kw_only=True)
class RunConfig:
    """What to compute.

    Attributes:
        dataset: Dataset name (see ``data.DATASETS``; ``imagefolder:PATH``), or the label of
            your own data given to ``compute``.
        dataset_options: The dataset's own settings (``resize``, ``crop``, ``normalize``,
            ...; see ``data``), JSON values.
        split: Split the solve runs on.
        holdout: Split measured after the solve (``None``: none).
        limit: Use only the first ``limit`` samples of each split, in dataset order.
        sample: Solve on ``sample`` samples of the solve split drawn uniformly without
            replacement under ``sample_seed`` (``data.sampled``); the held-out split stays
            whole. ``None``: all of it.
        sample_seed: The seed of that draw.
        model: Model name (see ``models.MODELS``); ``None`` in a store whose model was
            given by the caller (the tool built none).
        model_kwargs: Keyword arguments for the model factory.
        mode: ``"tensor"`` (one scale per layer, the paper's) or ``"channel"``.
        target_std: Output standard deviation to reach.
        tol: Tolerance on |mean| and |std - target| for layers solved iteratively, and the
            one verification judges the solve split by. ``None``: :data:`DEFAULT_TOL`, or
            for a model whose weights are bfloat16 / float16 :data:`HALF_TOL` (1e-2 /
            1e-3); a run records the value it used.
        max_iter: Most passes for one iteratively solved layer.
        orthogonal: Orthonormal pre-init before the solve (LSUV step I).
        seed: Seed of the model's initial weights (and of the orthogonal pre-init);
            ``None`` in a store whose model was given by the caller, without the pre-init.
        include: Solve only layers whose name matches one of these regular expressions
            (``re.search``); empty: all conv / linear layers.
        exclude: Then leave out layers matching any of these.
        batch_size: Samples per forward.
        shard_size: Samples per shard, the unit of work and of resume.
        verify: Measure every layer after the solve (and before it, at the initial weights).
        compile: Reduce conv outputs to moments with a compiled kernel (``compiled.py``):
            one read instead of the eager chunked two; the same accuracy, other bits, so
            it is part of the run's identity.
    """

    dataset: str = "mnist"
    dataset_options: dict = field(default_factory=dict)
    split: str = "train"
    holdout: str | None = "test"
    limit: int | None = None
    model: str | None = "mj"
    model_kwargs: dict = field(default_factory=dict)
    mode: Mode = "tensor"
    target_std: float = 1.0
    tol: float | None = None
    max_iter: int = 20
    orthogonal: bool = False
    seed: int | None = 0
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    batch_size: int = 256
    shard_size: int = 4096
    verify: bool = True
    sample: int | None = None
    sample_seed: int = 0
    compile: bool = False

    def __post_init__(self) -> None:
        # JSON brings lists back; keep the patterns as tuples so configs compare equal
        object.__setattr__(self, "include", tuple(self.include))
        object.__setattr__(self, "exclude", tuple(self.exclude))
        for option, patterns in (("--include", self.include), ("--exclude", self.exclude)):
            for pattern in patterns:
                try:
                    re.compile(pattern)
                except re.error as exc:
                    raise ConfigError(
                        f"{option} {pattern!r} is not a regular expression: {exc}"
                    ) from None
        if self.mode not in MODES:
            raise ConfigError(f"--mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        if not (math.isfinite(self.target_std) and self.target_std > 0):
            raise ConfigError(f"--target-std must be a positive number, got {self.target_std}")
        if self.tol is not None and not (math.isfinite(self.tol) and self.tol > 0):
            raise ConfigError(f"--tol must be a positive number, got {self.tol}")
        for name in ("max_iter", "batch_size", "shard_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be at least 1")
        if self.model is not None and not isinstance(self.model, str):
            raise ConfigError(f"model must be a name (a string), got {type(self.model).__name__}")
        if self.seed is not None and (
            isinstance(self.seed, bool) or not isinstance(self.seed, int)
        ):
            raise ConfigError(f"--seed must be an integer, got {self.seed!r}")
        if self.limit is not None and self.limit < 1:
            raise ConfigError(f"--limit must be at least 1, got {self.limit}")
        for name in ("sample", "sample_seed"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
                raise ConfigError(f"--{name.replace('_', '-')} must be an integer, got {value!r}")
        if not isinstance(self.compile, bool):
            raise ConfigError(f"compile must be true or false, got {self.compile!r}")
        if self.sample is not None and self.sample < 1:
            raise ConfigError(f"--sample must be at least 1, got {self.sample}")

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["include"], d["exclude"] = list(self.include), list(self.exclude)
        d["dataset_options"] = json.loads(json.dumps(dict(self.dataset_options)))
        if self.sample is None:  # configs recorded before samples existed stay the same
            del d["sample"], d["sample_seed"]
        if not self.compile:  # and so do eager ones, recorded before --compile existed
            del d["compile"]
        return d

    @classmethod
    def from_dict(cls, d: dict) -> RunConfig:
        if not isinstance(d, dict):
            raise ConfigError(f"a config must be a mapping of options, got {type(d).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ConfigError(f"unknown config keys: {', '.join(sorted(unknown))}")
        return cls(**d)

    def differences(self, other: RunConfig) -> list[str]:
        """Return ``"key: mine -> other"`` for every field that differs."""
        a, b = self.to_dict(), other.to_dict()
        return [f"{k}: {a[k]!r} -> {b[k]!r}" for k in a if a[k] != b[k]]


def with_default_tol(config: RunConfig, dtype: torch.dtype | None) -> RunConfig:
    """Return ``config`` with the tolerance for a model in ``dtype`` when it names none."""
    if config.tol is not None:
        return config
    return dataclasses.replace(config, tol=HALF_TOL.get(dtype, DEFAULT_TOL))
