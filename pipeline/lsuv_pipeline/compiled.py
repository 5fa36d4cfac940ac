"""The compiled path (``--compile``): a conv output's row sums in one read.

Eager PyTorch has no CPU kernel that returns both sums of a shifted value: the default
(``moments._row_moments``) shifts a cache-sized chunk of rows into a buffer and takes two
reductions of it. Here ``torch.compile`` (inductor: generated C++ on the CPU) fuses the
shift, the sum and the sum of squares into one loop over the batch, with no buffer at all.

The sums are the same quantities in another summation order, so a compiled run is
accurate to the same few float32 ulps as an eager one, but not bitwise equal to it:
``RunConfig.compile`` is part of the run's identity, and runs agree byte for byte within
the mode (inline, dask workers and ranks on the same hardware compile the same kernel).

The kernel is compiled once per process and dtype, for every shape (``dynamic=True``),
on a tiny batch before the first pass (:func:`prepare`), so that its compile time is
reported on its own and a machine where inductor cannot build (no C++ compiler) fails
before any pass, in one line. On CUDA the eager path is already one fused kernel
(``torch.var_mean``) and is kept.
"""

from __future__ import annotations

import threading
import time

import torch

from .errors import ConfigError, first_line

__all__ = ["prepare", "row_sums"]

_lock = threading.Lock()
_kernel = None
_ready: set[torch.dtype] = set()


def _shifted_sums(flat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row of ``(rows, n)`` values: the sum and the sum of squares of the row minus
    its first value."""
    shifted = flat - flat[:, :1]
    return shifted.sum(dim=1), (shifted * shifted).sum(dim=1)


def _compiled():
    global _kernel
    if _kernel is None:
        _kernel = torch.compile(_shifted_sums, dynamic=True, fullgraph=True)
    return _kernel


def prepare(dtype: torch.dtype = torch.float32) -> float:
    """Compile the row-sum kernel for ``dtype`` (once per process); return the seconds
    it took (0 when it was ready).

    Raises:
        ConfigError: ``torch.compile`` cannot build the kernel here.
    """
    with _lock:
        if dtype in _ready:
            return 0.0
        started = time.perf_counter()
        try:
            with torch.inference_mode():
                _compiled()(torch.arange(12, dtype=dtype).view(3, 4))
        except Exception as exc:
            raise ConfigError(
                f"--compile: torch.compile cannot build its kernel on this machine "
                f"({first_line(exc, 200)}); inductor needs a C++ compiler (g++) on the "
                "CPU. Run without --compile (the eager default gives the same statistics "
                "to a few float32 ulps)"
            ) from None
        _ready.add(dtype)
        return time.perf_counter() - started


def row_sums(flat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`_shifted_sums` of a contiguous ``(rows, n)`` CPU tensor, compiled (one read).

    Rows and positions of 1 are left to the caller (``torch.compile`` specializes sizes
    of 1, and a recompile there would change the summation order without a word).
    """
    if flat.dtype not in _ready:
        prepare(flat.dtype)
    return _compiled()(flat)
