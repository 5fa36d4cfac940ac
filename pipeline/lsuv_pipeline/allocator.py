"""The C heap of the processes this package starts: keep freed batch memory mapped.

A pass allocates and frees the same batch-sized tensors (megabytes each) for every batch.
With glibc's defaults, freed memory at the top of the heap goes back to the system once
it exceeds the trim threshold (128 KiB, or twice the mmap threshold, which rises with use
up to 32 MiB), so a later batch faults the same pages in again. On mj over MNIST at one
thread that is about 1.2 million minor faults per 100 batches; a dask worker, started by
its nanny with a 64 KiB trim threshold, pays them for every batch (README: the figures).

:func:`tune` sets the two thresholds with ``mallopt`` in a process this package owns:
the ``lsuv-pipeline`` command (``cli.main``) and the dask workers it starts
(:data:`WORKER_ENV`, read by glibc as those processes start; dask's nannies would
otherwise start them with a 64 KiB trim threshold, which faults every batch in again).
A Python caller's own process is left as it is (``compute()`` and ``lsuv_`` change
nothing global); set ``MALLOC_TRIM_THRESHOLD_`` / ``MALLOC_MMAP_THRESHOLD_`` there for
the same effect. The bits do not depend on it: PyTorch aligns tensors either way.

A process whose allocator was chosen otherwise (these variables or ``GLIBC_TUNABLES``
set, another allocator in ``LD_PRELOAD``) or that does not use glibc is not touched.
"""

from __future__ import annotations

import ctypes
import os
import platform

__all__ = ["WORKER_ENV", "chosen_elsewhere", "tune", "tuned", "worker_env"]

#: Allocations below this come from the heap (32 MiB: the most glibc accepts).
MMAP_THRESHOLD = 32 << 20
#: Freed memory kept mapped at the top of the heap before it goes back to the system: a
#: few batches' worth for most models, and little next to a dask worker's memory limit.
TRIM_THRESHOLD = 256 << 20

#: The same settings for a process started with this environment.
WORKER_ENV = {
    "MALLOC_MMAP_THRESHOLD_": str(MMAP_THRESHOLD),
    "MALLOC_TRIM_THRESHOLD_": str(TRIM_THRESHOLD),
}

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's <malloc.h>
_tuned = False


def chosen_elsewhere(env: dict[str, str] | None = None) -> bool:
    """Whether ``env`` (default: this process's) already chooses the allocator or its
    thresholds."""
    env = os.environ if env is None else env
    if any(env.get(k) for k in WORKER_ENV) or "malloc" in env.get("GLIBC_TUNABLES", ""):
        return True
    return "malloc" in env.get("LD_PRELOAD", "")  # jemalloc, tcmalloc


def tune() -> bool:
    """Set this process's glibc malloc thresholds (see the module); return whether it did.

    Only for a process this package owns; a no-op without glibc or when the allocator is
    chosen elsewhere.
    """
    global _tuned
    if _tuned:
        return True
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    if chosen_elsewhere():
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    done = mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD) and mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD)
    _tuned = bool(done)
    return _tuned


def tuned() -> bool:
    """Whether :func:`tune` set the thresholds in this process."""
    return _tuned


def worker_env() -> dict[str, str]:
    """The environment entries for a worker process this package starts: the same
    thresholds, unless this process's environment chose the allocator. Then nothing is
    added, and a dask worker starts with what its nanny gives it (dask's 64 KiB trim
    threshold replaces an inherited ``MALLOC_TRIM_THRESHOLD_``)."""
    return {} if chosen_elsewhere() else dict(WORKER_ENV)
