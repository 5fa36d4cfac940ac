"""The processes this package owns keep freed batch memory mapped (``allocator.py``)."""

import json
import os
import subprocess
import sys

from lsuv_pipeline import allocator

#: 20 batches of mj's four conv outputs at batch 256 and their ReLUs, after a first one;
#: prints the minor page faults the computing thread took and whether the thresholds were
#: set.
BATCHES = """
import json, resource, sys, torch
from lsuv_pipeline import allocator
tuned = allocator.tune() if sys.argv[1] == "tune" else False
sizes = [346_112, 921_600, 2_367_488, 2_957_312]
def batch():
    xs = [torch.ones(n) for n in sizes]
    ys = [torch.relu(x) for x in xs]
batch()
before = resource.getrusage(resource.RUSAGE_THREAD).ru_minflt
for _ in range(20):
    batch()
faults = resource.getrusage(resource.RUSAGE_THREAD).ru_minflt - before
print(json.dumps({"tuned": tuned, "faults": faults}))
"""


#: Faults of 20 tuned batches: well under a twentieth of their 127K pages (2.9K seen).
FEW = 6_000
#: The same on a dask worker, whose own threads allocate meanwhile: under a third.
WORKER_FEW = 40_000


def _clean_env(**extra) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in allocator.WORKER_ENV}
    env.pop("GLIBC_TUNABLES", None)
    env.pop("LD_PRELOAD", None)
    return {**env, **extra}


def _batches_of(script: str, mode: str, **env) -> dict:
    done = subprocess.run([sys.executable, "-c", script, mode], capture_output=True,
                          text=True, timeout=120, env=_clean_env(**env))  # fmt: skip
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def _batches(mode: str, **env) -> dict:
    return _batches_of(BATCHES, mode, **env)


def test_a_tuned_process_does_not_fault_its_batches_in_again():
    plain, tuned = _batches("plain"), _batches("tune")
    assert tuned["tuned"] and not plain["tuned"]
    # glibc's defaults hand freed batches back and fault them in again (15K-260K faults
    # here, by how its thresholds moved); tuned, the 20 batches (127K pages) reuse the
    # heap's pages
    assert tuned["faults"] < FEW, (plain, tuned)
    assert plain["faults"] > tuned["faults"], (plain, tuned)


def test_an_allocator_chosen_by_the_user_is_left_alone():
    chosen = _batches("tune", MALLOC_TRIM_THRESHOLD_=str(128 * 1024))
    assert not chosen["tuned"]
    assert allocator.chosen_elsewhere({"LD_PRELOAD": "/usr/lib/libjemalloc.so.2"})
    assert allocator.chosen_elsewhere({"GLIBC_TUNABLES": "glibc.malloc.trim_threshold=0"})
    assert allocator.chosen_elsewhere({"MALLOC_TOP_PAD_": "0"})
    assert not allocator.chosen_elsewhere({"LD_PRELOAD": ""})


def test_the_command_tunes_its_process_and_a_python_caller_is_untouched():
    script = (
        "import atexit, sys\n"
        "from lsuv_pipeline import allocator, compute\n"
        "print('imported', allocator.tuned(), flush=True)\n"
        "atexit.register(lambda: print('command', allocator.tuned(), flush=True))\n"
        "sys.argv = ['lsuv-pipeline', '--version']\n"
        "from lsuv_pipeline.cli import main\n"
        "main()\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=120, env=_clean_env())  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "imported False" in done.stdout and "command True" in done.stdout, done.stdout


def test_local_dask_workers_start_with_the_thresholds():
    """dask's nannies start workers with a 64 KiB trim threshold of their own, read by
    glibc as the worker starts; the workers of a run start with this package's."""
    from lsuv_pipeline.cluster import connect

    def faults() -> int:  # sent by value: the same batches as above, on the worker
        import resource

        import torch

        sizes = [346_112, 921_600, 2_367_488, 2_957_312]

        def batch():
            xs = [torch.ones(n) for n in sizes]
            return [torch.relu(x) for x in xs]

        batch()
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        for _ in range(20):
            batch()
        return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

    with connect(1, None, None, "cpu", 30) as executor:
        seen = list(executor.client.run(faults).values())
    # dask's 64 KiB trim threshold: about 257K faults, twice the batches' pages; with the
    # thresholds 3K-13K (the worker's own threads allocate too, more under load)
    assert len(seen) == 1 and seen[0] < WORKER_FEW, seen


#: 40 cut-sized batches (mj's conv4 output at batch 256), kept as a cache keeps them, with
#: a pause for compute after each; prints the page faults the main thread took itself.
GROWING = """
import json, resource, sys, time, torch
from lsuv_pipeline import allocator
tuned = allocator.tune() if sys.argv[1] == "tune" else False
kept = []
before = resource.getrusage(resource.RUSAGE_THREAD).ru_minflt
for _ in range(40):
    time.sleep(0.06)
    kept.append(torch.ones(2_957_312))
faults = resource.getrusage(resource.RUSAGE_THREAD).ru_minflt - before
print(json.dumps({"tuned": tuned, "faults": faults, "pages": 40 * 2_957_312 * 4 // 4096}))
"""


def test_a_tuned_process_faults_its_growing_heap_in_ahead_of_the_computing_thread():
    """A cache's cut is new memory in every solve: its first touch (a page fault per 4 KiB,
    costlier still where the host backs a VM's memory lazily) is taken by a helper thread
    of the command's process, off the computing thread."""
    plain, tuned = _batches_of(GROWING, "plain"), _batches_of(GROWING, "tune")
    assert tuned["tuned"]
    # untouched pages, faulted in by the thread itself (this kernel maps 2 pages a fault)
    assert plain["faults"] > plain["pages"] * 0.25, plain
    # tuned, the helper faults them in ahead of it (1.4K left, 2%); it needs 200 MB/s
    # here, and this VM's host backed new memory at 0.4-1.4 GB/s
    assert tuned["faults"] < plain["faults"] * 0.25, (plain, tuned)


def test_a_users_own_malloc_settings_reach_the_local_workers(monkeypatch):
    """dask's nannies start a worker with a 64 KiB trim threshold of their own; a user who
    chose the allocator's thresholds gets those on the workers, not dask's."""
    from lsuv_pipeline.cluster import connect

    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "131072")
    monkeypatch.delenv("MALLOC_MMAP_THRESHOLD_", raising=False)
    assert allocator.worker_env() == {"MALLOC_TRIM_THRESHOLD_": "131072"}

    def settings() -> dict:
        import os

        return {k: os.environ.get(k) for k in ("MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_THRESHOLD_")}

    with connect(1, None, None, "cpu", 30) as executor:
        (seen,) = executor.client.run(settings).values()
    assert seen == {"MALLOC_TRIM_THRESHOLD_": "131072", "MALLOC_MMAP_THRESHOLD_": None}


def test_the_helper_jumps_ahead_of_the_heaps_use_and_raises_the_pad_when_caught_up():
    """The helper's walk on a scripted heap: it faults in from the heap's use up to the
    break; when the use overtakes it, it starts again a lead past it and doubles the pad."""
    import ctypes
    import errno

    mib = 1 << 20
    # (break, start of the top chunk): at the start, then before each step
    states = iter([(100 * mib, 10 * mib), (100 * mib, 10 * mib), (100 * mib, 20 * mib),
                   (100 * mib, 50 * mib), (60 * mib, 30 * mib), (60 * mib, 30 * mib)])  # fmt: skip
    calls, pads = [], []

    def heap():
        return next(states)

    def madvise(start, size, advice):
        calls.append((start // mib, size // mib))
        if len(calls) == 4:  # the heap was trimmed under this call
            ctypes.set_errno(errno.ENOMEM)
            return -1
        if len(calls) == 5:  # end the walk as an old kernel would
            ctypes.set_errno(errno.EINVAL)
            return -1
        return 0

    allocator._prefault(heap, madvise, pads.append)
    lead, step = allocator.PREFAULT_LEAD // mib, allocator.PREFAULT_STEP // mib
    # from the use (10 MiB) on; still ahead of it at 20 MiB; caught up with at 50 MiB: a
    # lead past it, and the pad doubled; the break below it (trimmed), then a call failing
    # with ENOMEM: each time a lead past the use, up to the break, the pad as it was
    rest = 60 - 30 - lead
    assert calls == [(10, step), (10 + step, step), (50 + lead, step), (30 + lead, rest),
                     (30 + lead, rest)]  # fmt: skip
    assert pads == [2 * allocator.TOP_PAD]


def test_starting_local_workers_leaves_the_callers_environment_alone():
    """dask's nannies write their pre-spawn environment (ours, and dask's own
    OMP_NUM_THREADS=1 and trim threshold) into this process's os.environ; a run gives
    the caller's environment back as it was once its workers have started."""
    from lsuv_pipeline.cluster import connect

    before = dict(os.environ)
    with connect(1, None, None, "cpu", 30) as executor:
        during = dict(os.environ)
        (worker,) = executor.client.run(lambda: dict(__import__("os").environ)).values()
    assert during == before and dict(os.environ) == before
    # the workers still start with theirs
    assert worker["MALLOC_TRIM_THRESHOLD_"] == allocator.WORKER_ENV["MALLOC_TRIM_THRESHOLD_"]
