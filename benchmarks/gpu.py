"""The cost ratios on the device at hand (CUDA where there is one, else the CPU fallback).

    python benchmarks/gpu.py [--quick] [--repeats 3] [--write]

Per model (mj, resnet18 and timm's ViT-tiny from the zoo, on Fashion-MNIST images as the zoo
prepares them), in one process: one plain ``no_grad`` forward pass over the images on the
device (the unit), our solve inline, and our solve on a local dask cluster of one worker
per GPU (one worker on the CPU), each as *solve / forward*, medians over the repeats. The
inline and dask stores are compared array by array (SHA-256 over every array): on one
device type they must be the same bytes. On CUDA the inline solve also runs once under
``torch.cuda.set_sync_debug_mode("warn")``, counting the host synchronizations per batch.

Without CUDA it runs the same measurements on the CPU (1 torch thread), so the tests run
it; the figures of a GPU run go to ``gpu.md`` with ``--write`` where a GPU is lent.
"""

from __future__ import annotations

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
for _path in (str(REPO), str(REPO / "pipeline")):  # benchmark this checkout's package
    if _path not in sys.path:
        sys.path.insert(0, _path)

import json  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402

import click  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

from benchmarks import zoo  # noqa: E402
from benchmarks.common import DATA_ROOT, code_commit, cpu_model, log, median, store_digest, table  # noqa: E402
from lsuv_pipeline import RunConfig, compute  # noqa: E402

HERE = Path(__file__).resolve().parent
MODELS = ("mj", "resnet18", "timm:vit_tiny_patch16_224")
BATCH = 256


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def forward_seconds(model: nn.Module, x: torch.Tensor, device: torch.device) -> float:
    """One plain forward over ``x`` in batches, inputs copied to ``device`` as a pass does."""
    model.eval().to(device)
    _sync(device)
    started = time.perf_counter()
    for start in range(0, len(x), BATCH):
        model(x[start : start + BATCH].to(device, non_blocking=True))
    _sync(device)
    return time.perf_counter() - started


def solve(model: nn.Module, x: torch.Tensor, device: torch.device, out: Path, **kw):
    config = RunConfig(dataset="fashion-mnist", holdout=None, verify=False, batch_size=BATCH,
                       shard_size=max(BATCH, len(x) // 4))  # fmt: skip
    data = torch.utils.data.TensorDataset(x)
    return compute(config, out, model=model, data=data, device=str(device), **kw)


def _syncs(model: nn.Module, x: torch.Tensor, device: torch.device, out: Path) -> float:
    """Host synchronizations per batch of an inline solve (CUDA only)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            result = solve(model, x, device, out)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    batches = result.passes * -(-len(x) // BATCH)
    found = [w for w in caught if "synchroniz" in str(w.message)]
    return len(found) / batches


def measure_model(name: str, root: Path, samples: int, repeats: int, device: torch.device,
                  work: Path) -> dict:  # fmt: skip
    entry = next(e for e in zoo.entries() if e.name == name)
    fresh, x, shape = zoo.model_and_input(entry, root, samples)
    initial = {k: v.clone() for k, v in fresh.state_dict().items()}

    def model() -> nn.Module:
        fresh.load_state_dict(initial)
        return fresh

    workers = torch.cuda.device_count() if device.type == "cuda" else 1
    times = {"forward": [], "inline": [], "dask": []}
    digests = {}
    for r in range(repeats):
        times["forward"].append(forward_seconds(model(), x, device))
        inline = solve(model(), x, device, work / f"{name}-inline-{r}.zarr")
        times["inline"].append(inline.seconds)
        dask = solve(model(), x, device, work / f"{name}-dask-{r}.zarr", workers=workers)
        times["dask"].append(dask.seconds)
        digests.setdefault("inline", store_digest(inline.path))
        digests.setdefault("dask", store_digest(dask.path))
        log(f"{name} repeat {r + 1}/{repeats}: forward {times['forward'][-1]:.2f} s, inline "
            f"{inline.seconds:.2f} s, dask {dask.seconds:.2f} s")  # fmt: skip
    syncs = None
    if device.type == "cuda":
        syncs = _syncs(model(), x, device, work / f"{name}-syncs.zarr")
    return {
        "model": name,
        "input": shape,
        "samples": samples,
        "layers": len(inline.solved),
        "workers": workers,
        "times": times,
        "same_bytes": digests["inline"] == digests["dask"],
        "syncs_per_batch": syncs,
    }


def measure(root: Path, samples: int, repeats: int, models=MODELS) -> dict:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    with tempfile.TemporaryDirectory(prefix="lsuv-gpu-bench-") as tmp:
        rows = [measure_model(m, root, samples, repeats, device, Path(tmp)) for m in models]
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_model()
    return {"device": device.type, "where": where, "repeats": repeats, "rows": rows}


def render(res: dict) -> str:
    head = ["model", "input", "samples", "layers", "solve / forward inline",
            "solve / forward dask", "dask workers", "inline = dask bytes",
            "syncs / batch"]  # fmt: skip
    body = []
    for row in res["rows"]:
        unit = median(row["times"]["forward"])
        syncs = row["syncs_per_batch"]
        body.append([f"`{row['model']}`", row["input"], row["samples"], row["layers"],
                     f"{median(row['times']['inline']) / unit:.3g}",
                     f"{median(row['times']['dask']) / unit:.3g}", row["workers"],
                     "yes" if row["same_bytes"] else "NO",
                     "n/a (CPU)" if syncs is None else f"{syncs:.2f}"])  # fmt: skip
    fallback = res["device"] != "cuda"
    return "\n".join([
        "# Cost on the device: solve / forward, inline and on dask",
        "",
        f"Written by `python benchmarks/gpu.py --write` (commit {res['commit']}) on "
        f"{res['where']}" + (" (the CPU fallback: no CUDA device here)" if fallback else "")
        + f"; medians over {res['repeats']} repeat(s) in one process. *solve / forward* "
        "divides our solve's time (verification off) by one plain no-grad forward pass over "
        "the same images on the same device.",
        "",
        table(head, body),
        "",
    ])  # fmt: skip


@click.command()
@DATA_ROOT
@click.option("--quick", is_flag=True, help="512 images, one repeat.")
@click.option("--samples", default=4096, show_default=True)
@click.option("--repeats", default=3, show_default=True)
@click.option("--write", is_flag=True, help="Write gpu.md and gpu.json here.")
def main(data_root: Path, quick: bool, samples: int, repeats: int, write: bool) -> None:
    if not torch.cuda.is_available():
        torch.set_num_threads(1)
    res = measure(data_root, 512 if quick else samples, 1 if quick else repeats)
    res["commit"] = code_commit(["gpu.md", "gpu.json"])
    text = render(res)
    click.echo(text)
    if write:
        (HERE / "gpu.md").write_text(text)
        (HERE / "gpu.json").write_text(json.dumps(res, indent=1) + "\n")


if __name__ == "__main__":
    main()
