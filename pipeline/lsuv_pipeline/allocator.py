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

What the heap cannot reuse is new memory: an activation cache's cut grows to gigabytes in
every solve (mj over MNIST: 2.8 GB), and its first touch costs a page fault per 4 KiB on
the computing thread (on a VM whose host backs guest memory lazily, 0.4-2.5 s per GB: as
long as the whole cached solve). :func:`tune` therefore also pads each growth of the heap
(:data:`TOP_PAD`, raised up to :data:`MAX_TOP_PAD` while the heap's use keeps catching up)
and starts a helper thread that faults the mapped part above the heap's use in while the
computing thread works (``MADV_POPULATE_WRITE``, which maps pages without writing them, so
it is safe on memory in use); that thread takes the faults, on another core. The price is
memory: up to the pad, mapped above what is in use while the process runs.

A process whose allocator was chosen otherwise (these variables or ``GLIBC_TUNABLES``
set, another allocator in ``LD_PRELOAD``) or that does not use glibc is not touched.
"""

from __future__ import annotations

import ctypes
import errno
import os
import platform
import threading
import time

__all__ = ["WORKER_ENV", "chosen_elsewhere", "tune", "tuned", "worker_env"]

#: Allocations below this come from the heap (32 MiB: the most glibc accepts).
MMAP_THRESHOLD = 32 << 20
#: Freed memory kept mapped at the top of the heap before it goes back to the system: a
#: few batches' worth for most models, and little next to a dask worker's memory limit.
TRIM_THRESHOLD = 256 << 20
#: Heap mapped past what an allocation needs whenever the heap grows, faulted in ahead of
#: use by the helper thread (:func:`tune`); a trim keeps it mapped. The helper raises it.
TOP_PAD = 256 << 20
#: The most the helper thread raises the top pad to when the heap's use catches up with it
#: (glibc takes an int).
MAX_TOP_PAD = 1 << 30
#: The most the helper faults in at one call, so that it sees the heap's use often.
PREFAULT_STEP = 16 << 20
#: How far past the heap's use the helper starts again when that use has caught up with
#: it: about the batch the computing thread is writing.
PREFAULT_LEAD = 16 << 20

#: The same settings for a process started with this environment.
WORKER_ENV = {
    "MALLOC_MMAP_THRESHOLD_": str(MMAP_THRESHOLD),
    "MALLOC_TRIM_THRESHOLD_": str(TRIM_THRESHOLD),
}

_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD = -1, -2, -3  # glibc's <malloc.h>
_MADV_POPULATE_WRITE = 23  # Linux 5.14
_tuned = False
_helper: threading.Thread | None = None


def chosen_elsewhere(env: dict[str, str] | None = None) -> bool:
    """Whether ``env`` (default: this process's) already chooses the allocator or its
    thresholds."""
    env = os.environ if env is None else env
    chosen = (*WORKER_ENV, "MALLOC_TOP_PAD_")
    if any(env.get(k) for k in chosen) or "malloc" in env.get("GLIBC_TUNABLES", ""):
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
        libc = ctypes.CDLL(None, use_errno=True)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    settings = ((_M_MMAP_THRESHOLD, MMAP_THRESHOLD), (_M_TRIM_THRESHOLD, TRIM_THRESHOLD),
                (_M_TOP_PAD, TOP_PAD))  # fmt: skip
    _tuned = all(mallopt(option, value) for option, value in settings)
    if _tuned:
        _start_prefault(libc)
    return _tuned


class _Mallinfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks",
        "fordblks", "keepcost",
    )]  # fmt: skip


def _start_prefault(libc: ctypes.CDLL) -> None:
    """Start the thread that faults the heap's new top in (see the module)."""
    global _helper
    try:
        sbrk, madvise, mallinfo2 = libc.sbrk, libc.madvise, libc.mallinfo2  # glibc 2.33
    except AttributeError:
        return
    sbrk.restype, sbrk.argtypes = ctypes.c_void_p, [ctypes.c_ssize_t]
    madvise.restype = ctypes.c_int
    madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    mallinfo2.restype, mallinfo2.argtypes = _Mallinfo2, []

    def heap() -> tuple[int, int]:
        """The break, and where glibc carves the next allocation from the top (the start
        of the top chunk, ``keepcost`` bytes below the break)."""
        top = sbrk(0) or 0
        return top, top - mallinfo2().keepcost

    def pad(size: int) -> None:
        libc.mallopt(_M_TOP_PAD, size)

    _helper = threading.Thread(
        target=_prefault, args=(heap, madvise, pad), name="lsuv-prefault", daemon=True
    )
    _helper.start()


def _prefault(heap, madvise, pad) -> None:
    """Keep ahead of the heap's use and fault in the mapped part above it, to the break.

    The computing thread carves allocations upward from the start of the top chunk and
    faults in what it writes. When it has caught up with this thread, this thread starts
    again :data:`PREFAULT_LEAD` past it (rather than fault the same pages beside it) and
    doubles the top pad, up to :data:`MAX_TOP_PAD`, so that the heap grows further ahead
    of use. Sleeps while there is nothing to do (1 ms, backing off to 50 ms); ends for
    good if the kernel has no ``MADV_POPULATE_WRITE``. A heap trimmed meanwhile fails the
    call with ENOMEM, and the thread starts over from the heap's use.
    """
    page = os.sysconf("SC_PAGE_SIZE")
    top, used = heap()
    done: int | None = -(-used // page) * page
    padding = TOP_PAD
    pause = 0.001
    while True:
        top, used = heap()
        if done is None or top < done:  # trimmed: from the heap's use again
            done = -(-(used + PREFAULT_LEAD) // page) * page
        elif used > done:  # caught up with: go ahead again, and let the heap grow further
            if padding < MAX_TOP_PAD:
                padding = min(2 * padding, MAX_TOP_PAD)
                pad(padding)
            done = -(-(used + PREFAULT_LEAD) // page) * page
        if top <= done:
            time.sleep(pause)
            pause = min(pause * 2, 0.05)
            continue
        size = min(top - done, PREFAULT_STEP)
        if madvise(done, size, _MADV_POPULATE_WRITE) != 0:
            if ctypes.get_errno() != errno.ENOMEM:
                return  # EINVAL: an older kernel
            done = None  # trimmed meanwhile
            continue
        done += size
        pause = 0.001


def tuned() -> bool:
    """Whether :func:`tune` set the thresholds in this process."""
    return _tuned


def worker_env() -> dict[str, str]:
    """The environment entries for a worker process this package starts: the same
    thresholds, unless this process's environment chose the allocator. Then the user's own
    ``MALLOC_*`` settings are passed on as they are, so that a dask worker starts with
    them and not with its nanny's 64 KiB trim threshold (which replaces an inherited
    one); an allocator chosen by ``GLIBC_TUNABLES`` or ``LD_PRELOAD`` is inherited."""
    if not chosen_elsewhere():
        return dict(WORKER_ENV)
    return {k: v for k, v in os.environ.items() if k.startswith("MALLOC_")}
