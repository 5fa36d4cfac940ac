"""Image folders: our solve and our reading of a folder of JPEGs, against torchvision's.

A folder of JPEGs is written from Fashion-MNIST into a temporary directory (class
subfolders, 3 channels, upscaled with PIL), then, side by side in one process and repeated,
three things are timed:

* ``read``: every batch of the folder, preprocessed: ours (``loaded``, the passes' reader)
  with ``loader_workers`` 0 and the default, and torchvision's ``ImageFolder`` through a
  ``DataLoader(num_workers=cores)`` with the same Resize / CenterCrop / Normalize;
* ``epoch``: the baseline, that DataLoader and one forward of the model per batch;
* ``solve``: ``compute`` on ``imagefolder:PATH`` (no verification) with ``loader_workers``
  0 and the default, the activation cache holding the cut;
* ``solve`` with a cache budget too small to hold any shard's cut (1 MB): every pass
  then runs from the input, decoding the folder again (timed in the first repeat only:
  it costs many epochs);
* ``epoch`` and ``solve`` again for timm's ViT-tiny (patch 16, at the crop size), the
  transformer of the zoo.

The tables give medians of the repeats and ratios to the baseline epoch (timings on a shared
machine are noisy; ratios of runs made seconds apart are what the sections compare). Torch
runs on one thread in this process; the DataLoader's worker processes are the baseline's.

    python benchmarks/folder.py [--quick] [--write]

``--write`` writes ``folder.md`` into ``benchmarks/`` (``benchmarks/quick/`` with
``--quick``).
"""

from __future__ import annotations

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
for _path in (str(REPO), str(REPO / "pipeline")):  # benchmark this checkout's package
    if _path not in sys.path:
        sys.path.insert(0, _path)

import json  # noqa: E402
import os  # noqa: E402
import shutil  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

import click  # noqa: E402
import torch  # noqa: E402

from benchmarks.common import (  # noqa: E402
    DATA_ROOT,
    OUT,
    code_commit,
    cpu_model,
    load_average,
    log,
    median,
    table,
)
from lsuv_pipeline import RunConfig, compute  # noqa: E402
from lsuv_pipeline.data import DatasetSpec, open_source  # noqa: E402
from lsuv_pipeline.data.loading import default_workers  # noqa: E402
from lsuv_pipeline.executors import loaded  # noqa: E402
from lsuv_pipeline.models import ModelSpec, build_model  # noqa: E402

FULL = {"images": 2000, "size": 128, "resize": 112, "crop": 96, "repeats": 3}
QUICK = {"images": 96, "size": 40, "resize": 36, "crop": 32, "repeats": 1}
BATCH = 64
SHARD = 512
MODEL = "resnet18"
VIT = "timm:vit_tiny_patch16_224"
SMALL = "1MB"  # no shard's cut fits: every pass from the input


def write_jpegs(folder: Path, data_root: Path, images: int, size: int) -> Path:
    """The first ``images`` Fashion-MNIST training images as ``size`` px RGB JPEGs, one
    subfolder per class."""
    import torchvision.datasets as tvd
    from PIL import Image

    data = tvd.FashionMNIST(root=str(data_root), train=True, download=False)
    for i in range(images):
        label = int(data.targets[i])
        (folder / f"{label}").mkdir(parents=True, exist_ok=True)
        im = Image.fromarray(data.data[i].numpy()).convert("RGB")
        im = im.resize((size, size), Image.BILINEAR)
        im.save(folder / f"{label}" / f"{i:05d}.jpg", quality=90)
    return folder


def options(sizes: dict) -> dict:
    return {"resize": sizes["resize"], "crop": sizes["crop"]}


def torchvision_loader(folder: Path, sizes: dict, workers: int):
    from torch.utils.data import DataLoader
    from torchvision import datasets as tvd
    from torchvision import transforms as T

    transform = T.Compose([
        T.Resize(sizes["resize"]),
        T.CenterCrop(sizes["crop"]),
        T.ToTensor(),
        T.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    ])  # fmt: skip
    data = tvd.ImageFolder(str(folder), transform=transform)
    return DataLoader(data, batch_size=BATCH, num_workers=workers)


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def read_ours(folder: Path, sizes: dict, workers: int) -> None:
    spec = DatasetSpec(name=f"imagefolder:{folder}", options=options(sizes))
    src = open_source(spec).set_loader_workers(workers)
    for shard in src.shards(SHARD):
        for _ in loaded(src, shard, BATCH, torch.device("cpu")):
            pass


def read_torchvision(loader) -> None:
    for _ in loader:
        pass


def vit_kwargs(sizes: dict) -> dict:
    return {"img_size": sizes["crop"]}


def epoch_torchvision(loader, model) -> None:
    with torch.inference_mode():
        for x, _ in loader:
            model(x)


def solve(
    folder: Path, sizes: dict, workers: int, work: Path, model: str = MODEL, budget=None
) -> None:
    config = RunConfig(
        dataset=f"imagefolder:{folder}",
        dataset_options=options(sizes),
        model=model,
        model_kwargs=vit_kwargs(sizes) if model == VIT else {},
        holdout=None,
        verify=False,
        batch_size=BATCH,
        shard_size=SHARD,
    )
    out = work / f"solve-{workers}.zarr"
    compute(config, out, device="cpu", loader_workers=workers, overwrite=True,
            cache_memory=budget)  # fmt: skip
    shutil.rmtree(out)


def measure(data_root: Path, sizes: dict) -> dict:
    """Time every case ``sizes["repeats"]`` times, interleaved; return the raw seconds."""
    cores = len(os.sched_getaffinity(0))
    workers = default_workers()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory(prefix="lsuv-folder-") as tmp:
        work = Path(tmp)
        log(f"writing {sizes['images']} JPEGs of {sizes['size']} px")
        folder = write_jpegs(work / "jpegs", data_root, sizes["images"], sizes["size"])
        loader = torchvision_loader(folder, sizes, cores)
        model = build_model(ModelSpec(name=MODEL), seed=0, in_channels=3, num_classes=10).eval()
        vit = build_model(ModelSpec(name=VIT, kwargs=vit_kwargs(sizes)), seed=0, in_channels=3,
                          num_classes=10).eval()  # fmt: skip
        cases = {
            "read, ours, 0 loader workers": lambda: read_ours(folder, sizes, 0),
            f"read, ours, {workers} loader workers": lambda: read_ours(folder, sizes, workers),
            f"read, torchvision DataLoader, {cores} workers": lambda: read_torchvision(loader),
            f"epoch, torchvision DataLoader, {cores} workers": lambda: epoch_torchvision(
                loader, model
            ),
            "solve, ours, 0 loader workers": lambda: solve(folder, sizes, 0, work),
            f"solve, ours, {workers} loader workers": lambda: solve(folder, sizes, workers, work),
            f"solve, ours, {workers} loader workers, cache budget {SMALL} (too small)": (
                lambda: solve(folder, sizes, workers, work, budget=SMALL)
            ),
            f"epoch, torchvision DataLoader, {cores} workers, ViT": lambda: epoch_torchvision(
                loader, vit
            ),
            f"solve, ours, {workers} loader workers, ViT": lambda: solve(
                folder, sizes, workers, work, VIT
            ),
        }
        seconds: dict[str, list[float]] = {name: [] for name in cases}
        for r in range(sizes["repeats"]):
            for name, fn in cases.items():
                if r and "too small" in name:
                    continue
                seconds[name].append(timed(fn))
                log(f"repeat {r + 1}: {name}: {seconds[name][-1]:.2f} s")
    return {"cores": cores, "loader_workers": workers, "seconds": seconds}


def render(raw: dict, sizes: dict, command: str) -> str:
    seconds = raw["seconds"]
    epochs = {k.endswith("ViT"): median(v) for k, v in seconds.items() if k.startswith("epoch")}

    def unit(name: str) -> float:  # each model's own baseline epoch
        return epochs[name.endswith("ViT")]

    rows = [
        [name, f"{median(v):.2f}", f"{median(v) / unit(name):.2f}",
         " ".join(f"{s:.2f}" for s in v)]
        for name, v in seconds.items()
    ]  # fmt: skip
    solves = [median(v) for k, v in seconds.items() if k.startswith("solve") and k.count(",") == 2]
    small = next(median(v) for k, v in seconds.items() if "too small" in k)
    vit = next(median(v) for k, v in seconds.items() if k.startswith("solve") and k.endswith("ViT"))
    baseline = epochs[False]
    reads = [median(v) for k, v in seconds.items() if k.startswith("read, ours")]
    lines = [
        "# Image folders: our loading and solve against torchvision's",
        "",
        f"`{command}`: {sizes['images']} Fashion-MNIST images as {sizes['size']} px RGB "
        f"JPEGs, read with resize {sizes['resize']}, crop {sizes['crop']}, batches of "
        f"{BATCH}, shards of {SHARD}; model {MODEL} (and {VIT} at {sizes['crop']} px where "
        f"the case says ViT), torch on 1 thread in the measuring process; medians of "
        f"{sizes['repeats']} interleaved repeat(s). Each ratio is to the same model's "
        "baseline epoch.",
        "",
        table(["case", "median s", "/ baseline epoch", "each run, s"], rows),
        "",
        f"Reading the folder with {raw['loader_workers']} loader workers takes "
        f"{reads[1] / reads[0]:.2f} of the time with none; the solve with them takes "
        f"{solves[1] / solves[0]:.2f} of the time without "
        f"({solves[0] / baseline:.2f} -> {solves[1] / baseline:.2f} baseline epochs). With a "
        f"cache budget of {SMALL}, too small for any shard's cut, every pass runs from the "
        f"input and the solve costs {small / baseline:.2f} baseline epochs. The ViT's solve "
        f"costs {vit / epochs[True]:.2f} of its own baseline epochs.",
        "",
        f"Machine: {cpu_model()}, {raw['cores']} cores available, load average at start "
        f"{raw['load']}; torch {torch.__version__}; commit {raw['commit']}; "
        f"{raw['date']} UTC.",
        "",
    ]
    return "\n".join(lines)


@click.command()
@click.option("--quick", is_flag=True, help="A smoke test: few small images, one repeat.")
@DATA_ROOT
@click.option("--write", is_flag=True, help="Write folder.md and folder.json (else print only).")
@OUT
def main(quick, data_root, write, out):
    """Time reading and solving an image folder against torchvision's DataLoader."""
    sizes = QUICK if quick else FULL
    load = load_average()
    raw = measure(data_root.resolve(), sizes)
    raw.update(
        load=load,
        commit=code_commit(["folder.md", "folder.json"]),
        date=time.strftime("%Y-%m-%d %H:%M", time.gmtime()),
        sizes=sizes,
    )
    command = "python benchmarks/folder.py" + (" --quick" if quick else "")
    text = render(raw, sizes, command)
    click.echo(text)
    if write:
        folder = (out or REPO / "benchmarks" / ("quick" if quick else "")).resolve()
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "folder.json").write_text(json.dumps(raw, indent=1))
        (folder / "folder.md").write_text(text)
        log(f"wrote {folder / 'folder.md'}")


if __name__ == "__main__":
    main()
