"""In a training script: ``lsuv_pipeline.lsuv_`` against PyPI ``lsuv``, on the same loader.

    python benchmarks/loop.py [--quick] [--repeats 3] [--write]

The setup of a training script: the first 10000 Fashion-MNIST training images as a
shuffling ``DataLoader`` of batch 128 (``ToTensor``), a small CNN. In one process, per
repeat and in alternating order, each init starts from the same freshly built model:

- ``lsuv_pipeline.lsuv_(model, loader)``: exact over all 10000 images (its defaults);
- ``lsuv.lsuv_with_dataloader(model, loader)``: PyPI ``lsuv``, one batch, iterated;
- one plain ``no_grad`` forward epoch over the loader, the unit of the times.

Then each result's per-layer output mean and std over the whole 10000 (float64 moments,
hooks written in ``quality.py``). With ``--write`` the table goes to ``loop.md``.
"""

from __future__ import annotations

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
for _path in (str(REPO), str(REPO / "pipeline")):  # benchmark this checkout's package
    if _path not in sys.path:
        sys.path.insert(0, _path)

import json  # noqa: E402
import time  # noqa: E402

import click  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402
from torch.utils.data import DataLoader, Subset  # noqa: E402

from benchmarks.common import DATA_ROOT, code_commit, cpu_model, log, median, table, version  # noqa: E402
from benchmarks.quality import layer_stats  # noqa: E402
from lsuv_pipeline import lsuv_  # noqa: E402
from lsuv_pipeline.data import source_from  # noqa: E402

HERE = Path(__file__).resolve().parent


def small_cnn(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(1, 16, 3), nn.ReLU(), nn.Conv2d(16, 32, 3), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10),
    )  # fmt: skip


def ours(model: nn.Module, loader: DataLoader) -> nn.Module:
    return lsuv_(model, loader, progress=False, device="cpu")


def pypi(model: nn.Module, loader: DataLoader) -> nn.Module:
    from lsuv import lsuv_with_dataloader

    return lsuv_with_dataloader(model, loader, device=torch.device("cpu"), verbose=False)


@torch.no_grad()
def forward(model: nn.Module, loader: DataLoader) -> nn.Module:
    model.eval()
    for x, _ in loader:
        model(x)
    return model


METHODS = {"lsuv_pipeline.lsuv_": ours, "lsuv (PyPI)": pypi, "forward epoch": forward}


def measure(root: str | Path, count: int, repeats: int) -> dict:
    from torchvision import datasets, transforms

    train = datasets.FashionMNIST(root, train=True, transform=transforms.ToTensor())
    data = Subset(train, range(count))
    loader = DataLoader(data, batch_size=128, shuffle=True, generator=torch.Generator())
    whole = source_from(data, name="fashion-mnist", split="train")
    times: dict[str, list[float]] = {m: [] for m in METHODS}
    stats = {}
    for r in range(repeats):
        order = list(METHODS) if r % 2 == 0 else list(reversed(METHODS))
        for name in order:
            model = small_cnn(r)
            started = time.perf_counter()
            METHODS[name](model, loader)
            times[name].append(time.perf_counter() - started)
            if name != "forward epoch" and r == 0:
                stats[name] = layer_stats(model, whole)
            log(f"repeat {r + 1}/{repeats}: {name} {times[name][-1]:.2f} s")
    return {"count": count, "repeats": repeats, "times": times, "stats": stats}


def render(res: dict) -> str:
    unit = median(res["times"]["forward epoch"])
    rows = []
    for name in ("lsuv_pipeline.lsuv_", "lsuv (PyPI)"):
        s = res["stats"][name]
        worst_std = max(abs(v["std"] - 1) for v in s.values())
        worst_mean = max(abs(v["mean"]) for v in s.values())
        t = median(res["times"][name])
        rows.append([f"`{name}`", f"{t:.2f}", f"{t / unit:.3g}", f"{worst_std:.2e}",
                     f"{worst_mean:.2e}"])  # fmt: skip
    head = ["init", "seconds (median)", "forward epochs", "max abs(std - 1)", "max abs(mean)"]
    lines = [
        "# In a training script: `lsuv_` against PyPI `lsuv` on the same loader",
        "",
        f"Written by `python benchmarks/loop.py --write` (commit {res['commit']}, "
        f"{res['cpu']}, torch {torch.__version__}, lsuv {version('lsuv')}, "
        f"{torch.get_num_threads()} torch thread(s)). The first {res['count']} "
        "Fashion-MNIST training images, a shuffling DataLoader of batch 128, the small CNN "
        "of the README; times are medians over "
        f"{res['repeats']} repeats in one process, in alternating order; *forward epochs* "
        "divides by the median of a plain no-grad epoch over the same loader "
        f"({unit:.2f} s). The statistics are every conv / linear layer's output over all "
        f"{res['count']} images.",
        "",
        table(head, rows),
        "",
    ]
    return "\n".join(lines)


@click.command()
@DATA_ROOT
@click.option("--quick", is_flag=True, help="1000 images, one repeat.")
@click.option("--repeats", default=3, show_default=True)
@click.option("--write", is_flag=True, help="Write loop.md and loop.json here.")
def main(data_root: Path, quick: bool, repeats: int, write: bool) -> None:
    torch.set_num_threads(1)
    res = measure(data_root, 1000 if quick else 10000, 1 if quick else repeats)
    res.update(commit=code_commit(["loop.md", "loop.json"]), cpu=cpu_model())
    text = render(res)
    click.echo(text)
    if write:
        (HERE / "loop.md").write_text(text)
        (HERE / "loop.json").write_text(json.dumps(res, indent=1, default=str) + "\n")


if __name__ == "__main__":
    main()
