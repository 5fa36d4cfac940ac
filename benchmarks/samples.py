"""Sample-size study: how far from mean 0 / std 1 an LSUV solved on N samples leaves each layer.

::

    python benchmarks/samples.py --data-root ../shared/data --write          # full: ~8 min, 1 core
    python benchmarks/samples.py --data-root ../shared/data --quick --write  # seconds

Per model (``mj``, torchvision ``resnet18`` with its stem for one channel, and a small ViT:
the zoo's ``TinyEncoder``, a 4x4 patch-embedding conv, two ``nn.TransformerEncoder`` layers
of width 64, a mean pool and a linear head), built once under seed 0: the same starting
weights are solved (tensor mode) on

* the whole "full" training set (Fashion-MNIST; a first-``limit`` subset for the larger
  models, said in the report),
* N samples of it drawn uniformly without replacement (the pipeline's ``sample``), for
  each N below the full size and several draw seeds,
* the first N of it after a stable sort by label (class-sorted, unshuffled data: what a
  one-batch init sees when the loader does not shuffle an ordered dataset).

Then every solved layer's output mean and std is measured over the whole full training set
and over the test split: for conv / linear networks with ``quality.layer_stats`` (forward
hooks, float64 merge), for the ViT, whose attention projections are not modules, with the
zoo's independent float64 forward (``zoo.float64_check``). The split-to-split gap, the test
split against the training set for the full solve, is the yardstick: a sample whose error
is within that gap is as good as the full set for data the solve did not see.

``--write`` writes ``samples.md``, ``samples.json`` and ``samples.png`` into ``benchmarks/``
(``benchmarks/quick/``, git-ignored, with ``--quick``); without it the report is printed.
"""

from __future__ import annotations

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
for _path in (str(REPO), str(REPO / "pipeline")):  # benchmark this checkout's package
    if _path not in sys.path:
        sys.path.insert(0, _path)

import json  # noqa: E402
import statistics  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402
from dataclasses import asdict, dataclass  # noqa: E402

import click  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

from benchmarks.common import (  # noqa: E402
    DATA_ROOT,
    code_commit,
    cpu_model,
    figure,
    labels,
    load_average,
    log,
    table,
)
from benchmarks.quality import layer_stats  # noqa: E402
from benchmarks.zoo import TinyEncoder, float64_check  # noqa: E402
from lsuv_pipeline import RunConfig, compute, mj  # noqa: E402
from lsuv_pipeline.data import DatasetSpec, open_source  # noqa: E402
from lsuv_pipeline.models import ModelSpec, build_model  # noqa: E402

DATASET = "fashion-mnist"
SPLITS = ("train", "test")
METRICS = {"std": "abs(std−1)", "mean": "abs(mean)"}


def _seeded(factory: Callable[[], nn.Module]) -> nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return factory()


#: The models: name -> builder of the model under seed 0 (one input channel, 10 classes).
MODELS: dict[str, Callable[[], nn.Module]] = {
    "mj": lambda: _seeded(lambda: mj(in_channels=1, num_classes=10)),
    "resnet18": lambda: build_model(ModelSpec(name="resnet18"), seed=0, in_channels=1),
    "vit": lambda: _seeded(lambda: TinyEncoder(in_channels=1, num_classes=10)),
}


@dataclass(frozen=True, kw_only=True)
class SampleSettings:
    """Sizes of a run.

    Attributes:
        quick: Smoke-test sizes.
        full: Per model, the size of the "full" training set (the first ``full`` training
            samples; ``None``: the whole split).
        test: Per model, test samples measured on (``None``: the whole split).
        sizes: The sample sizes N (those below a model's full size are run).
        seeds: Draw seeds of the random samples.
        batch_size: Samples per forward.
        threads: Torch threads.
    """

    quick: bool
    full: dict[str, int | None]
    test: dict[str, int | None]
    sizes: tuple[int, ...]
    seeds: tuple[int, ...]
    batch_size: int = 256
    threads: int = 1

    @classmethod
    def make(cls, quick: bool, **overrides) -> SampleSettings:
        if quick:
            sizes = dict(full={m: 300 for m in MODELS}, test={m: 200 for m in MODELS},
                         sizes=(100,), seeds=(0, 1))  # fmt: skip
        else:
            sizes = dict(full={"mj": None, "resnet18": 10000, "vit": 10000},
                         test={"mj": None, "resnet18": 5000, "vit": 5000},
                         sizes=(100, 1000, 10000), seeds=(0, 1, 2))  # fmt: skip
        return cls(quick=quick, **{**sizes, **overrides})

    def record(self) -> dict:
        return asdict(self)


def _split(split: str, limit: int | None, root: Path) -> torch.Tensor:
    spec = DatasetSpec(name=DATASET, split=split, root=str(root), limit=limit, download=False)
    src = open_source(spec)
    return src.batch(0, src.count)  # (N, 1, 28, 28)


class _Tensors:
    """Images in memory as ``quality.layer_stats`` reads a source: ``count`` and ``batch``."""

    def __init__(self, x: torch.Tensor) -> None:
        self.x, self.count = x, x.shape[0]

    def batch(self, start: int, stop: int) -> torch.Tensor:
        return self.x[start:stop]


def solve(name: str, x: torch.Tensor, *, sample: int | None, seed: int, work: Path,
          batch_size: int) -> tuple[nn.Module, dict[str, bool]]:  # fmt: skip
    """The model ``name`` under seed 0, solved (tensor mode) on ``x`` or on ``sample`` of it
    drawn under ``seed``; return it and ``{solved layer: whether it has a bias}``."""
    config = RunConfig(dataset=f"{DATASET} {x.shape[0]}", holdout=None, verify=False,
                       sample=sample, sample_seed=seed, batch_size=batch_size,
                       shard_size=max(x.shape[0], 1))  # fmt: skip
    data = torch.utils.data.TensorDataset(x)
    result = compute(config, work / f"{name}.zarr", model=MODELS[name](), data=data,
                     device="cpu", overwrite=True)  # fmt: skip
    return result.model, {s.name: s.has_bias for s in result.solved}


def moments(model: nn.Module, x: torch.Tensor, layers: list[str],
            batch_size: int) -> dict[str, list[float]]:  # fmt: skip
    """``{layer: [mean, std]}`` of each solved layer's whole output over ``x``."""
    if any(isinstance(m, nn.MultiheadAttention) for m in model.modules()):
        return {k: list(v) for k, v in float64_check(model, x, layers, batch_size).items()}
    stats = layer_stats(model, _Tensors(x), batch_size)
    return {k: [stats[k]["mean"], stats[k]["std"]] for k in layers}


def variants(full: int, settings: SampleSettings) -> list[tuple[str, int, int]]:
    """(kind, N, seed): random draws per N and seed, the full set, class-sorted first N."""
    sizes = [n for n in settings.sizes if n < full]
    return [
        *(("random", n, s) for n in sizes for s in settings.seeds),
        ("full", full, 0),
        *(("sorted", n, 0) for n in sizes),
    ]


def measure(settings: SampleSettings, root: Path, work: Path) -> dict:
    torch.set_num_threads(settings.threads)
    out = {}
    for name in MODELS:
        x = _split("train", settings.full[name], root)
        y = labels(DATASET, "train", root, x.shape[0])
        x_sorted = x[torch.sort(y, stable=True).indices]
        data = {"train": x, "test": _split("test", settings.test[name], root)}
        runs = []
        for kind, n, seed in variants(x.shape[0], settings):
            t = time.perf_counter()
            solve_on = x_sorted[:n] if kind == "sorted" else x
            model, layers = solve(name, solve_on, sample=n if kind == "random" else None,
                                  seed=seed, work=work, batch_size=settings.batch_size)  # fmt: skip
            runs.append({"kind": kind, "n": n, "seed": seed, **{
                split: moments(model, data[split], list(layers), settings.batch_size)
                for split in SPLITS}})  # fmt: skip
            log(f"samples {name} {kind} {n} seed {seed}: {time.perf_counter() - t:.1f} s")
        out[name] = {"train_count": x.shape[0], "test_count": data["test"].shape[0],
                     "layers": list(layers), "bias": layers, "runs": runs}  # fmt: skip
    return out


# -- summaries -------------------------------------------------------------------------------


def error(pair: list[float], metric: str) -> float:
    """|std - 1| or |mean| of one layer's ``[mean, std]``."""
    return abs(pair[1] - 1) if metric == "std" else abs(pair[0])


def groups(model: dict) -> dict[str, list[dict]]:
    """Label ("random 100", "full", "sorted 100") -> its runs (seeds), in table order."""
    out: dict[str, list[dict]] = {}
    for r in model["runs"]:
        label = "full" if r["kind"] == "full" else f"{r['kind']} {r['n']}"
        out.setdefault(label, []).append(r)
    return out


def measured(model: dict, metric: str) -> list[str]:
    """The layers a metric applies to: |mean| only where a bias can shift the mean (a conv
    without bias before a norm, as in resnet18, keeps its mean whatever the solve)."""
    return [k for k in model["layers"] if metric == "std" or model["bias"][k]]


def layer_errors(model: dict, metric: str, split: str) -> dict[str, dict[str, float]]:
    """Label -> layer -> the error, the mean over that label's seeds (:func:`measured`)."""
    return {
        label: {
            layer: statistics.fmean(error(r[split][layer], metric) for r in runs)
            for layer in measured(model, metric)
        }
        for label, runs in groups(model).items()
    }


def gap(model: dict, metric: str) -> dict[str, float]:
    """Per layer, the split-to-split gap of the full solve: |test - train| of std or mean."""
    full = groups(model)["full"][0]
    i = 1 if metric == "std" else 0
    return {k: abs(full["test"][k][i] - full["train"][k][i]) for k in measured(model, metric)}


def _e(x: float) -> str:
    return f"{x:.2e}"


def render(raw: dict, out: Path | None) -> str:
    settings = raw["settings"]
    summary_rows, layer_tables = [], []
    for name, model in raw["models"].items():
        for label, runs in groups(model).items():
            row = [name, label, len(runs)]
            for metric in METRICS:
                for split in SPLITS:
                    values = layer_errors(model, metric, split)[label].values()
                    row.append(_e(max(values)) if values else "no bias")
            summary_rows.append(row)
    summary_header = ["model", "solved on", "seeds"] + [
        f"max {METRICS[m]} {s}" for m in METRICS for s in SPLITS
    ]
    for metric in METRICS:
        for split in SPLITS:
            for name, model in raw["models"].items():
                errs, g = layer_errors(model, metric, split), gap(model, metric)
                rows = [
                    [name, layer, *(_e(e[layer]) for e in errs.values()), _e(g[layer])]
                    for layer in measured(model, metric)
                ]
                where = "set" if split == "train" else "split"
                layer_tables += [
                    f"{METRICS[metric]} over the {split} {where}, {name} (mean over seeds):",
                    "",
                    table(["model", "layer", *errs, "split gap"], rows, right=2),
                    "",
                ]
    plot = figure(out / "samples.png", lambda plt: _plot(plt, raw)) if out else ""
    m = raw["machine"]
    sizes = ", ".join(
        f"{name}: {mo['train_count']} training / {mo['test_count']} test samples"
        for name, mo in raw["models"].items()
    )
    return "\n".join(
        [
            "# Sample-size study: a sample against the full training set",
            "",
            f"Written by `python benchmarks/samples.py{' --quick' if settings['quick'] else ''}"
            f" --write` ({'quick mode: a smoke test' if settings['quick'] else 'full mode'}) on "
            f"{m['date (UTC)']} at commit {m['commit']}, {m['cpu']}, {settings['threads']} "
            f"torch thread, {raw['seconds'] / 60:.1f} min{_rendered(raw)}. Every number and "
            "sentence below is computed from this run (raw values in `samples.json`).",
            "",
            f'Fashion-MNIST. The "full" training set per model ({sizes}); '
            "for the larger models it is the first part of the training split, not all "
            f"60000. Each model starts from the same weights (seed 0) and is solved in tensor "
            f"mode on: `random N`, N samples of the full set drawn without replacement "
            f"(seeds {', '.join(map(str, settings['seeds']))}, errors averaged over them); "
            "`full`, all of it; `sorted N`, the first N after a stable sort by label (the "
            "class-ordered, unshuffled case). Errors are measured over the whole full "
            "training set and over the test split. *split gap*: for the full solve, "
            "|test − train| of the layer's std (or mean), the difference between two "
            "samples of the same distribution that no solve can remove. |mean| is shown "
            "for layers with a bias only (a solve cannot move the mean of a layer without one; "
            "resnet18's convs have none).",
            "",
            "Worst layer per model and solve:",
            "",
            table(summary_header, summary_rows, right=2),
            "",
            plot,
            "",
            *_findings(raw),
            "",
            "Every layer:",
            "",
            *layer_tables,
        ]
    )


def _findings(raw: dict) -> list[str]:
    lines = ["What it shows:", ""]
    for name, model in raw["models"].items():
        n_layers = len(model["layers"])
        g = gap(model, "std")
        test = layer_errors(model, "std", "test")
        train = layer_errors(model, "std", "train")
        gmed = statistics.median(g.values())
        line = (
            f"- {name} ({n_layers} layers): the full solve is exact on the set it solved "
            f"(worst |std−1| {max(train['full'].values()):.1e}); its split gap is "
            f"{max(g.values()):.1e} at the worst layer, {gmed:.1e} at the median one."
        )
        beyond = {}  # random N -> layers where it is worse than full by more than the gap
        for label in test:
            if not label.startswith("random"):
                continue
            worse = [k for k in model["layers"] if test[label][k] > test["full"][k] + g[k]]
            beyond[int(label.split()[1])] = len(worse)
            ratio = statistics.median(
                test[label][k] / max(test["full"][k], 1e-12) for k in model["layers"]
            )
            line += (
                f" A {label.removeprefix('random ')}-sample solve leaves the worst layer "
                f"{max(train[label].values()):.1e} off on the training set and "
                f"{max(test[label].values()):.1e} on the test split (full: "
                f"{max(test['full'].values()):.1e}); on the test split it is worse than the "
                f"full solve by more than the split gap at {len(worse)} of {n_layers} layers, "
                f"its median layer {ratio:.1f}x the full solve's error."
            )
        for label in test:
            if label.startswith("sorted"):
                n = label.removeprefix("sorted ")
                rnd = f"random {n}"
                line += (
                    f" Class-sorted first {n}: worst layer {max(test[label].values()):.1e} "
                    f"on the test split"
                    + (
                        f" against {max(test[rnd].values()):.1e} for a random {n}"
                        if rnd in test
                        else ""
                    )
                    + "."
                )
        means = layer_errors(model, "mean", "test")
        if means["full"]:
            line += (
                f" Worst |mean| on the test split ({_layers(len(means['full']))} with a bias): "
                f"full solve {max(means['full'].values()):.1e}, split gap "
                f"{max(gap(model, 'mean').values()):.1e}"
                + "".join(f", {k} {max(v.values()):.1e}" for k, v in means.items() if k != "full")
                + "."
            )
        line += " " + _verdict(beyond, n_layers, model["train_count"])
        lines.append(line)
    return lines


def _layers(n: int) -> str:
    return f"{n} layer" + ("s" if n != 1 else "")


def _verdict(beyond: dict[int, int], n_layers: int, full: int) -> str:
    """Up to which random sample size the full set is measurably better, from which on not."""
    worse = [n for n, k in beyond.items() if k]
    within = [n for n, k in beyond.items() if not k and n > max(worse, default=0)]
    if not beyond:
        return "No random sample size below the full set was run."
    if not worse:
        return (
            f"**Verdict:** every random sample tried ({', '.join(map(str, beyond))}) is within "
            "the split gap of the full solve at every layer on the test split: here the full "
            "set buys nothing held-out data can see."
        )
    text = (
        f"**Verdict:** the full set is measurably better (beyond the split gap on the test "
        f"split) than a random sample of {max(worse)} at {_layers(beyond[max(worse)])} of "
        f"{n_layers}"
    )
    if within:
        return text + (
            f"; from {min(within)} random samples on, the sample is within the split gap at "
            "every layer and the full set buys nothing held-out data can see."
        )
    return text + (
        f"; {max(worse)} is the largest random sample tried (the full set here is {full}), "
        "so no sample size was found at which a sample is within the gap at every layer."
    )


def _plot(plt, raw: dict):
    models = raw["models"]
    fig, axes = plt.subplots(2, len(models), figsize=(5 * len(models), 9), squeeze=False)
    for col, (name, model) in enumerate(models.items()):
        for row, metric in enumerate(METRICS):
            ax = axes[row][col]
            for split, style in (("test", "-"), ("train", ":")):
                errs = {k: max(v.values(), default=0.0)
                        for k, v in layer_errors(model, metric, split).items()}  # fmt: skip
                for kind, marker in (("random", "o"), ("sorted", "s")):
                    pts = [(int(k.split()[1]), v) for k, v in errs.items() if k.startswith(kind)]
                    pts.append((model["train_count"], errs["full"]))
                    pts.sort()
                    ax.plot([p[0] for p in pts], [max(p[1], 1e-9) for p in pts], style,
                            marker=marker, label=f"{kind} N, {split}")  # fmt: skip
            worst_gap = max(gap(model, metric).values(), default=1e-9)
            ax.axhline(worst_gap, color="black", lw=0.8, ls="--", label="split gap (worst layer)")
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_title(f"{name}: worst layer {METRICS[metric]}")
            ax.set_xlabel("samples the solve used (rightmost: full)")
            ax.legend(fontsize=7)
    fig.suptitle("Worst layer's error after a solve on N samples (random: mean over seeds)")
    fig.subplots_adjust(hspace=0.35)
    return fig


def _rendered(raw: dict) -> str:
    if "rendered" not in raw:
        return ""
    return f" (this text rendered from those numbers at commit {raw['rendered']})"


def _machine() -> dict:
    return {
        "date (UTC)": time.strftime("%Y-%m-%d %H:%M", time.gmtime()),
        "commit": code_commit(["deep.*", "samples.*", "quick/*"]),
        "cpu": cpu_model(),
        "torch": torch.__version__,
        "load average at start": load_average(),
    }


@click.command()
@click.option("--quick", is_flag=True, help="Small sizes: a smoke test.")
@DATA_ROOT
@click.option("--write", is_flag=True, help="Write samples.md, samples.json and samples.png.")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path),
              help="Where --write writes [default: benchmarks/, or quick/ in it].")  # fmt: skip
@click.option(
    "--render",
    "render_from",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="Measure nothing: write samples.md and samples.png from this samples.json "
    "(into --out, or its folder).",
)
def main(quick, data_root, write, out, render_from):
    """Solve on N samples against the full set; measure every layer on both splits."""
    if render_from is not None:
        raw = json.loads(render_from.read_text())
        raw["rendered"] = _machine()["commit"]  # the report's text, from the same numbers
        out = (out or render_from.parent).resolve()
        out.mkdir(parents=True, exist_ok=True)
        (out / "samples.md").write_text(render(raw, out) + "\n")
        click.echo(out / "samples.md")
        return
    settings = SampleSettings.make(quick)
    t = time.perf_counter()
    raw = {"machine": _machine(), "settings": settings.record()}
    with tempfile.TemporaryDirectory(prefix="lsuv-samples-") as work:
        raw["models"] = measure(settings, data_root.resolve(), Path(work))
    raw["seconds"] = time.perf_counter() - t
    raw["machine"]["load average at end"] = load_average()
    if not write:
        click.echo(render(raw, None))
        return
    out = (out or REPO / "benchmarks" / ("quick" if quick else "")).resolve()
    out.mkdir(parents=True, exist_ok=True)
    (out / "samples.json").write_text(json.dumps(raw, indent=1))
    (out / "samples.md").write_text(render(raw, out) + "\n")
    click.echo(out / "samples.md")


if __name__ == "__main__":
    main()
