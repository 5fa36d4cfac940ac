"""What every section shares: settings, data helpers, timing and memory, markdown.

Timings on a shared machine are noisy, so sections report ratios of runs made side by side
(in the same process, seconds apart) and medians over repeats, never one absolute time.
Peak memory is the peak resident set size (the kernel's high-water mark, :func:`peak_rss_mib`)
of a fresh child process per measurement (``probe.py``), reset to the current size right
before the measured code (:func:`reset_peak`): the peak only ever grows, so two measurements
cannot share a process, and without the reset the transient peaks of importing torch and
decoding the dataset would hide a solve's own.
"""

from __future__ import annotations

import contextlib
import gc
import hashlib
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from importlib import metadata
from pathlib import Path

import click
import torch
from torch import nn

from lsuv_pipeline.data import DatasetSpec, Source, open_source

REPO = Path(__file__).resolve().parents[1]

#: The ``--data-root`` option of every benchmark script.
DATA_ROOT = click.option(
    "--data-root",
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    envvar="LSUV_DATA_ROOT",
    default=REPO / "data",
    show_default="$LSUV_DATA_ROOT, else data/",
    help="Folder with MNIST and Fashion-MNIST in torchvision's layout.",
)

#: The ``--out`` option of the scripts that write one report (``NAME.md`` and ``NAME.json``).
OUT = click.option(
    "--out",
    type=click.Path(file_okay=False, path_type=Path),
    show_default="benchmarks/; with --quick benchmarks/quick/, git-ignored",
    help="Where --write puts the report (its .md and .json).",
)


@dataclass(frozen=True, kw_only=True)
class Settings:
    """How big and how often: everything that differs between ``--quick`` and a full run.

    Attributes:
        data_root: Folder with MNIST and Fashion-MNIST in torchvision's layout.
        out: Folder that receives RESULTS.md, results.json and the plots.
        work: Scratch folder for run stores (deleted after the run).
        quick: Smoke-test sizes instead of the full ones.
        limit: Samples per split (``None``: the whole split).
        resnet_limit: Samples of the resnet18 cost comparison (a deep network on a subset).
        repeats: Timed runs per measurement; tables show their median.
        seeds: Training seeds (each seeds the weights, the one-batch draw and the shuffle).
        threads: Torch intra-op threads per process.
        jobs: Training runs in parallel (one process each).
        batch_size: Samples per forward in every solve and in the reference forward pass.
        train_batch: SGD minibatch size.
        epochs: Training epochs.
        lr: SGD learning rate (fixed, no schedule).
        momentum: SGD momentum.
        scales: Training-set sizes of the scaling section, in copies of the split.
        workers: Dask workers in the scaling section (when this build has a dask executor).
    """

    data_root: Path
    out: Path
    work: Path
    quick: bool
    limit: int | None
    resnet_limit: int
    repeats: int
    seeds: tuple[int, ...]
    threads: int = 1
    jobs: int = 2
    batch_size: int = 256
    train_batch: int = 128
    epochs: int = 2
    lr: float = 0.01
    momentum: float = 0.9
    scales: tuple[int, ...] = (1, 2, 4)
    workers: int = 2

    @classmethod
    def make(cls, *, quick: bool, limit: int | None = None, **kwargs) -> Settings:
        """Return the quick or full settings; ``limit`` (if given) overrides the default."""
        if quick:
            defaults = {"limit": 4096, "resnet_limit": 512, "repeats": 1, "seeds": (0,)}
        else:
            defaults = {"limit": None, "resnet_limit": 4096, "repeats": 3, "seeds": (0, 1, 2)}
        if limit is not None:
            defaults["limit"] = limit
        return cls(quick=quick, **{**defaults, **kwargs})

    def record(self) -> dict:
        """The settings that shape the numbers (not where the files are)."""
        return {k: v for k, v in asdict(self).items() if not isinstance(v, Path)}


def log(text: str) -> None:
    """Progress on stderr, so stdout stays free for results."""
    print(f"[{time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)


def median(values: Sequence[float]) -> float:
    return statistics.median(values)


# -- data ---------------------------------------------------------------------------------


def source(name: str, split: str, root: Path | str, limit: int | None) -> Source:
    """Open one split, normalized as the pipeline does, limited to ``limit`` samples."""
    return open_source(
        DatasetSpec(name=name, split=split, root=str(root), limit=limit, download=False)
    )


def labels(name: str, split: str, root: Path, count: int) -> torch.Tensor:
    """Class labels of the first ``count`` samples (a :class:`Source` holds images only)."""
    import torchvision.datasets as tvd

    cls = {"mnist": tvd.MNIST, "fashion-mnist": tvd.FashionMNIST}[name]
    return cls(root=str(root), train=split == "train", download=False).targets[:count].clone()


class Repeated(Source):
    """``times`` copies of a source back to back; sample ``i`` is sample ``i % count``.

    Nothing is copied, so the data takes the memory of one copy whatever ``times`` is, and
    the solve's own memory is what a scaling measurement sees grow (or not).
    """

    def __init__(self, inner: Source, times: int) -> None:
        self.inner = inner
        self.times = times
        self.name = inner.name
        self.split = inner.split
        self.count = inner.count * times
        self.sample_shape = inner.sample_shape
        self.num_classes = inner.num_classes
        self.transform = {**inner.transform, "repeat": times}
        digest = hashlib.sha256(f"{inner.fingerprint} x{times}".encode()).hexdigest()
        self.fingerprint = "sha256:" + digest

    def batch(self, start: int, stop: int) -> torch.Tensor:
        n = self.inner.count
        parts = []
        while start < stop:  # a batch may straddle the end of one copy
            offset = (start // n) * n
            end = min(stop, offset + n)
            parts.append(self.inner.batch(start - offset, end - offset))
            start = end
        return parts[0] if len(parts) == 1 else torch.cat(parts)


def one_batch(src: Source, size: int, seed: int) -> torch.Tensor:
    """A random batch of ``size`` samples, as the first batch of a shuffled loader would be."""
    g = torch.Generator().manual_seed(seed)
    idx = torch.randperm(src.count, generator=g)[: min(size, src.count)]
    return torch.cat([src.batch(i, i + 1) for i in idx.tolist()])


@torch.no_grad()
def forward_pass(model: nn.Module, src: Source, batch_size: int) -> None:
    """One plain no-grad forward over the split, in batches: the unit of cost."""
    model.eval()
    for start in range(0, src.count, batch_size):
        model(src.batch(start, min(start + batch_size, src.count)))


def store_digest(path: Path) -> str:
    """SHA-256 over every array of a run store (path, dtype, bytes), the partials excepted.

    Two runs that wrote the same final weights and statistics, byte for byte, have the
    same digest.
    """
    import zarr

    arrays = {}

    def walk(group, prefix: str) -> None:
        for name, member in group.members():
            full = f"{prefix}{name}"
            if isinstance(member, zarr.Array):
                arrays[full] = member[...]
            elif full != "partial":
                walk(member, full + "/")

    walk(zarr.open_group(str(path), mode="r"), "")
    h = hashlib.sha256()
    for key in sorted(arrays):
        h.update(f"{key} {arrays[key].dtype} {arrays[key].shape}\n".encode())
        h.update(arrays[key].tobytes())
    return h.hexdigest()


# -- processes and memory -----------------------------------------------------------------


def peak_rss_mib() -> float:
    """Peak resident set size of this process so far, in MiB.

    Linux: ``VmHWM`` of ``/proc/self/status``, the high-water mark that :func:`reset_peak`
    resets. Not ``ru_maxrss``: Linux folds the parent's RSS at the time of the spawn into a
    child's ``ru_maxrss`` (at exec), and the reset does not lower it. Elsewhere
    ``ru_maxrss`` (macOS reports bytes, others KiB).
    """
    with contextlib.suppress(OSError), open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 2**10  # kB
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10


def reset_peak() -> bool:
    """Reset the peak RSS to the current RSS (Linux); return whether it was reset.

    Writing ``5`` to ``/proc/self/clear_refs`` resets the kernel's high-water mark
    (``VmHWM``, proc(5)), so a peak read later belongs to what ran after the reset, not to
    the imports or the data loading before it.
    """
    gc.collect()
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    return True


#: glibc malloc settings of every measured process: keep freed memory in the heap.
#: By default glibc serves a batch's activations (tens of MB) with fresh ``mmap`` pages and
#: hands them back when freed, so the next batch page-faults them in again. On the
#: benchmark's VM that cost a plain forward pass over MNIST about 40% of its time (8.7 s
#: against 5.2 s, mj, one thread), but not a solve that holds its activations in the
#: cache, which made ratios against the forward pass depend on the allocator, not on the
#: work. With these, every method and the reference forward run with warm memory.
MALLOC_ENV = {
    "MALLOC_MMAP_THRESHOLD_": str(2**32),  # fixed: no per-batch mmap / munmap
    "MALLOC_TRIM_THRESHOLD_": str(2**36),  # freed heap memory stays mapped
}


def child_env(threads: int, pipeline: Path | None = None, tuned: bool = True) -> dict[str, str]:
    """Environment of a child process: this checkout importable (its package, or the one
    in ``pipeline``: another revision's), ``threads`` threads, :data:`MALLOC_ENV` unless
    ``tuned`` is false (glibc's defaults, as a user's process has them)."""
    package = str(pipeline) if pipeline is not None else str(REPO / "pipeline")
    paths = [package, str(REPO), os.environ.get("PYTHONPATH", "")]
    base = {k: v for k, v in os.environ.items() if k not in MALLOC_ENV}
    return {
        **base,
        **(MALLOC_ENV if tuned else {}),
        "PYTHONPATH": os.pathsep.join(p for p in paths if p),
        "OMP_NUM_THREADS": str(threads),
        "MKL_NUM_THREADS": str(threads),
    }


def probe_spec(settings: Settings, **kw) -> dict:
    """A probe spec: the MNIST training split at the run's size, batch, threads and scratch
    folder, with the reference forward pass; ``kw`` adds or overrides keys."""
    return {
        "dataset": "mnist",
        "data_root": str(settings.data_root),
        "limit": settings.limit,
        "batch_size": settings.batch_size,
        "threads": settings.threads,
        "work": str(settings.work),
        "forward": True,
        **kw,
    }


def run_probe(spec: dict, threads: int, pipeline: Path | None = None, tuned: bool = True) -> dict:
    """Run ``probe.py`` on ``spec`` in a fresh process (``child_env``); return the JSON it
    prints last."""
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.probe", json.dumps(spec)],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=child_env(threads, pipeline, tuned),
    )
    if proc.returncode != 0:
        raise RuntimeError(f"probe {spec} failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# -- machine and markdown -----------------------------------------------------------------


def cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def _git(*args: str) -> str:
    try:
        out = subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return out.stdout.strip()


def version(dist: str) -> str:
    """The installed version of a distribution, or ``"not installed"``."""
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "not installed"


def machine(settings: Settings) -> dict:
    """What the numbers were measured on."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    # the report's own files (rewritten by every run) do not make the measured code dirty
    commit = code_commit(["RESULTS.md", "results.json", "*.png"])
    return {
        "date (UTC)": time.strftime("%Y-%m-%d %H:%M", time.gmtime()),
        "commit": commit,
        "cpu": cpu_model(),
        "cores available": cores,
        "torch threads per process": settings.threads,
        "torch": torch.__version__,
        "cpu capability": torch.backends.cpu.get_cpu_capability(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "lsuv (PyPI)": version("lsuv"),
        "load average at start (1, 5, 15 min)": load_average(),
    }


def code_commit(outputs: Sequence[str]) -> str:
    """The short commit of the checkout, marked when files other than ``outputs`` (patterns
    under ``benchmarks/``, a report's own files) have uncommitted changes."""
    commit = _git("rev-parse", "--short", "HEAD")
    excluded = [f":(exclude)benchmarks/{p}" for p in outputs]
    if _git("status", "--porcelain", "--untracked-files=no", "--", ".", *excluded):
        commit += " (with uncommitted changes)"
    return commit


def load_average() -> str:
    """The 1, 5 and 15 minute load averages: how busy the shared machine was."""
    if not hasattr(os, "getloadavg"):
        return "unknown"
    return ", ".join(f"{x:.2f}" for x in os.getloadavg())


def table(header: Sequence[str], rows: Sequence[Sequence[object]], right: int = 1) -> str:
    """A markdown table; columns from index ``right`` on are right-aligned."""
    cells = [[str(c) for c in header], *[[str(c) for c in row] for row in rows]]
    marks = ["---" if i < right else "---:" for i in range(len(header))]
    lines = [cells[0], marks, *cells[1:]]
    return "\n".join("| " + " | ".join(line) + " |" for line in lines)


def figure(path: Path, draw) -> str:
    """Draw with matplotlib (Agg) into ``path``; return the markdown image link."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig = draw(plt)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return f"![{path.stem}]({path.name})"
