"""Deep thin plain networks: where an init decides whether training starts at all.

::

    python benchmarks/deep.py --data-root ../shared/data --write          # full: ~45 min, 1 core
    python benchmarks/deep.py --data-root ../shared/data --quick --write  # seconds

A FitNet-style family (Romero et al. 2015, the networks of Mishkin & Matas 2015, Table 3):
3x3 convolutions with ReLU in three stages of thin widths, a 2x2 max pool after each stage,
then a hidden linear layer and the classifier; no normalization, no skip connection.
``depth`` counts the weight layers (convs and linears). Each (dataset, depth, init, seed)
builds the network under ``seed``, applies the init (data-driven ones on the training
split: one random batch, a random sample, or all of it), then trains one copy per learning
rate of the grid with the same recipe: SGD with momentum, fixed minibatch, fixed number of
steps, the minibatch order drawn from ``seed``. Every init gets the same grid; the best rate
per init is chosen on the training loss of the last window (never on the test split), and
its test accuracy is reported, the whole grid shown beside it.

``--write`` writes ``deep.md``, ``deep.json`` and ``deep.png`` into ``benchmarks/``
(``benchmarks/quick/``, git-ignored, with ``--quick``); without it the report is printed.
"""

from __future__ import annotations

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
for _path in (str(REPO), str(REPO / "pipeline")):  # benchmark this checkout's package
    if _path not in sys.path:
        sys.path.insert(0, _path)

import copy  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import statistics  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402
from dataclasses import asdict, dataclass  # noqa: E402

import click  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402
from torch.nn import functional as F  # noqa: E402

from benchmarks import baselines  # noqa: E402
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
from lsuv_pipeline.data import DatasetSpec, open_source  # noqa: E402

DATASETS = ("mnist", "fashion-mnist")
NUM_CLASSES = 10
CHANCE = math.log(NUM_CLASSES)  # the loss of equal logits
#: "Started": the mean loss of the last :data:`RUNNING` steps is below this.
STARTED = 0.95 * CHANCE
RUNNING = 10
WINDOWS = 25  # loss-curve points per run
#: "Collapsed": started, then ended at no better than this test accuracy (chance is 0.1).
COLLAPSED = 0.15

#: The inits, in table order: the training section's, plus ours on random samples.
INITS: dict[str, baselines.Init] = {
    "default": baselines.INITS["default"],
    "kaiming": baselines.INITS["kaiming"],
    "orthogonal": baselines.INITS["orthogonal"],
    "pypi-lsuv-256": baselines.INITS["pypi-lsuv-256"],
    "seed-lsuv-256": baselines.INITS["seed-lsuv-256"],
    "ours-tensor": baselines.INITS["ours-tensor"],
    "ours-channel": baselines.INITS["ours-channel"],
    **{
        f"ours-{mode}-{label}": baselines.Init(
            f"ours, {mode} mode, {n} random training samples", baselines.ours(mode, n)
        )
        for n, label in ((1000, "1k"), (10000, "10k"))
        for mode in ("tensor", "channel")
    },
}


@dataclass(frozen=True, kw_only=True)
class DeepSettings:
    """Sizes of a run (everything that differs between ``--quick`` and a full run).

    Attributes:
        quick: Smoke-test sizes.
        depths: Weight layers of the networks trained.
        widths: Channels of the three conv stages.
        hidden: Width of the hidden linear layer.
        size: Input side: the 28x28 images resized (bilinear) to ``size x size``.
        train_limit: Training samples (``None``: the whole split); the data-driven inits
            and the training both use these.
        test_limit: Test samples the accuracy is measured on (``None``: the whole split).
        inits: Names of :data:`INITS` run.
        lrs: The learning-rate grid, shared by every init.
        momentum: SGD momentum.
        batch: SGD minibatch size.
        steps: SGD steps per run (the fixed budget).
        seeds: Seeds (each seeds the weights, the init's draw and the minibatch order).
        threads: Torch threads.
    """

    quick: bool
    depths: tuple[int, ...]
    widths: tuple[int, int, int]
    hidden: int
    size: int
    train_limit: int | None
    test_limit: int | None
    inits: tuple[str, ...]
    lrs: tuple[float, ...]
    momentum: float
    batch: int
    steps: int
    seeds: tuple[int, ...]
    threads: int = 1

    @classmethod
    def make(cls, quick: bool, **overrides) -> DeepSettings:
        if quick:
            sizes = dict(depths=(11,), widths=(4, 8, 8), hidden=16, size=16, train_limit=1200,
                         test_limit=500, inits=("default", "kaiming", "seed-lsuv-256",
                                                "ours-tensor", "ours-channel-1k"),
                         lrs=(0.01, 0.03), steps=40, seeds=(0,))  # fmt: skip
        else:
            sizes = dict(depths=(11, 19), widths=(8, 16, 32), hidden=64, size=16,
                         train_limit=None, test_limit=5000, inits=tuple(INITS),
                         lrs=(0.01, 0.03), steps=150, seeds=(0, 1, 2))  # fmt: skip
        return cls(quick=quick, momentum=0.9, batch=64, **{**sizes, **overrides})

    def record(self) -> dict:
        return asdict(self)


def fitnet(depth: int, widths: tuple[int, int, int], hidden: int, size: int,
           in_channels: int = 1, num_classes: int = NUM_CLASSES) -> nn.Sequential:  # fmt: skip
    """A plain FitNet-style network with ``depth`` weight layers (``depth - 2`` convs).

    The convs are split over three stages as evenly as possible, the first stages taking the
    remainder; each stage ends in a 2x2 max pool; then ``Linear -> ReLU -> Linear``.
    """
    convs = depth - 2
    if convs < 3:
        raise ValueError(f"depth must be at least 5 (three conv stages), got {depth}")
    per_stage = [convs // 3 + (i < convs % 3) for i in range(3)]
    layers: list[nn.Module] = []
    c = in_channels
    for width, n in zip(widths, per_stage, strict=True):
        for _ in range(n):
            layers += [nn.Conv2d(c, width, 3, padding=1), nn.ReLU()]
            c = width
        layers.append(nn.MaxPool2d(2))
    side = size // 8
    layers += [nn.Flatten(), nn.Linear(c * side * side, hidden), nn.ReLU(),
               nn.Linear(hidden, num_classes)]  # fmt: skip
    return nn.Sequential(*layers)


def _data(name: str, root: Path, settings: DeepSettings):
    """The resized training source, its images and labels, and the test images and labels."""

    def open_split(split, limit):
        spec = DatasetSpec(name=name, split=split, root=str(root), limit=limit, download=False,
                           options={"resize": settings.size})  # fmt: skip
        return open_source(spec)

    train = open_split("train", settings.train_limit)
    test = open_split("test", settings.test_limit)
    return (
        train,
        train.batch(0, train.count),  # (N, 1, size, size)
        labels(name, "train", root, train.count),
        test.batch(0, test.count),
        labels(name, "test", root, test.count),
    )


def train(model: nn.Module, x, y, x_test, y_test, *, lr: float, seed: int,
          settings: DeepSettings) -> dict:  # fmt: skip
    """Train ``model`` for the fixed budget; return its loss curve, events and accuracy."""
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=settings.momentum)
    g = torch.Generator().manual_seed(seed)
    window = max(1, settings.steps // WINDOWS)
    order = torch.randperm(x.shape[0], generator=g)
    position, losses, started, diverged = 0, [], None, False
    model.train()
    for step in range(1, settings.steps + 1):
        if position + settings.batch > x.shape[0]:  # a new epoch: a new order
            order, position = torch.randperm(x.shape[0], generator=g), 0
        idx = order[position : position + settings.batch]
        position += settings.batch
        loss = F.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
        if not math.isfinite(losses[-1]):
            diverged = True
            break
        if started is None and step >= RUNNING and statistics.fmean(losses[-RUNNING:]) < STARTED:
            started = step
    curve = [statistics.fmean(losses[k : k + window]) for k in range(0, len(losses), window)]
    correct = 0
    if not diverged:
        model.eval()
        with torch.no_grad():
            for s in range(0, x_test.shape[0], 1000):
                correct += (model(x_test[s : s + 1000]).argmax(1) == y_test[s : s + 1000]).sum()
    return {
        "lr": lr,
        "window": window,
        "curve": curve,
        "final_loss": curve[-1] if not diverged else math.inf,
        "started": started,
        "diverged": diverged,
        "test_acc": int(correct) / x_test.shape[0] if not diverged else 0.1,
    }


def measure(settings: DeepSettings, root: Path, work: Path,
            partial: Callable[[dict], None] | None = None) -> dict:  # fmt: skip
    """Every (dataset, depth, init, seed), each trained at every learning rate.

    Seeds are the outer loop, so a run stopped early has every configuration at fewer
    seeds; ``partial`` is called with the results so far after each init.
    """
    torch.set_num_threads(settings.threads)
    data = {d: _data(d, root, settings) for d in DATASETS}
    result = {"train_count": data[DATASETS[0]][0].count,
              "test_count": data[DATASETS[0]][3].shape[0], "runs": []}  # fmt: skip
    runs = result["runs"]
    total = len(DATASETS) * len(settings.depths) * len(settings.inits) * len(settings.seeds)
    for seed in settings.seeds:
        for dataset in DATASETS:
            src, x, y, x_test, y_test = data[dataset]
            for depth in settings.depths:
                for name in settings.inits:
                    t = time.perf_counter()
                    torch.manual_seed(seed)
                    model = fitnet(depth, settings.widths, settings.hidden, settings.size)
                    model = INITS[name].init(model, src, seed=seed, work=work)
                    init_s = time.perf_counter() - t
                    for lr in settings.lrs:
                        run = train(copy.deepcopy(model), x, y, x_test, y_test, lr=lr,
                                    seed=seed, settings=settings)  # fmt: skip
                        runs.append({"dataset": dataset, "depth": depth, "init": name,
                                     "seed": seed, "init_s": init_s, **run})  # fmt: skip
                    best = min(runs[-len(settings.lrs) :], key=lambda r: r["final_loss"])
                    log(f"deep {len(runs) // len(settings.lrs)}/{total}: {dataset} depth {depth}"
                        f" {name} seed {seed}: best lr {best['lr']} test acc "
                        f"{best['test_acc']:.4f} ({time.perf_counter() - t:.0f} s)")  # fmt: skip
                    if partial is not None:
                        partial(result)
    return result


# -- summaries -------------------------------------------------------------------------------


def groups(runs: list[dict]) -> dict[tuple, list[dict]]:
    """(dataset, depth, init, lr) -> its runs over seeds, in run order."""
    out: dict[tuple, list[dict]] = {}
    for r in runs:
        out.setdefault((r["dataset"], r["depth"], r["init"], r["lr"]), []).append(r)
    return out


def _stats(runs: list[dict]) -> dict:
    acc = [r["test_acc"] for r in runs]
    losses = [r["final_loss"] for r in runs]
    started = [r["started"] for r in runs if r["started"] is not None]
    return {
        "acc_mean": statistics.fmean(acc),
        "acc_std": statistics.stdev(acc) if len(acc) > 1 else 0.0,
        "acc_min": min(acc),
        "acc_max": max(acc),
        "loss_mean": statistics.fmean(losses),  # inf when any run diverged
        "started_median": statistics.median(started) if started else None,
        "started": len(started),
        "diverged": sum(r["diverged"] for r in runs),
        "never_started": sum(r["started"] is None and not r["diverged"] for r in runs),
        "collapsed": sum(
            r["started"] is not None and not r["diverged"] and r["test_acc"] <= COLLAPSED
            for r in runs
        ),
        "seeds": len(runs),
    }


def best(raw: dict) -> dict[tuple, dict]:
    """(dataset, depth, init) -> the stats at its best learning rate (lowest mean final
    training loss over seeds; a grid point where any seed diverged counts as infinite)."""
    stats = {k: _stats(v) for k, v in groups(raw["runs"]).items()}
    out: dict[tuple, dict] = {}
    for (d, depth, init, lr), s in stats.items():
        key = (d, depth, init)
        if key not in out or s["loss_mean"] < out[key]["loss_mean"]:
            out[key] = {**s, "lr": lr}
    return out


def _pct(x: float) -> str:
    return f"{100 * x:.2f}"


def _started(s: dict) -> str:
    return "never" if s["started_median"] is None else f"{s['started_median']:.0f}"


def render(raw: dict, out: Path | None) -> str:
    settings = raw["settings"]
    b = best(raw)
    stats = {k: _stats(v) for k, v in groups(raw["runs"]).items()}
    rows = [
        [
            d,
            depth,
            f"`{i}`",
            s["lr"],
            _pct(s["acc_mean"]),
            _pct(s["acc_std"]),
            f"{_pct(s['acc_min'])}–{_pct(s['acc_max'])}",
            f"{s['loss_mean']:.3f}",
            _started(s),
            f"{s['started']}/{s['seeds']}",
            f"{s['diverged']}/{s['seeds']}",
            f"{s['never_started']}/{s['seeds']}",
            f"{s['collapsed']}/{s['seeds']}",
        ]
        for (d, depth, i), s in b.items()
    ]
    header = ["dataset", "depth", "init", "best lr", "test acc % (mean)", "std", "min–max",
              "final train loss", "steps to below chance (median)", "started",
              "diverged", "never started", "collapsed"]  # fmt: skip
    lrs = settings["lrs"]
    grid_rows = [
        [d, depth, f"`{i}`"]
        + [
            f"{_pct(stats[d, depth, i, lr]['acc_mean'])} "
            f"({stats[d, depth, i, lr]['diverged']} div, "
            f"{stats[d, depth, i, lr]['never_started']} ns)"
            for lr in lrs
        ]
        for (d, depth, i) in b
    ]
    grid_header = ["dataset", "depth", "init", *(f"lr {lr}: test acc %" for lr in lrs)]
    plot = figure(out / "deep.png", lambda plt: _plot(plt, raw, b)) if out else ""
    w = settings["widths"]
    m = raw["machine"]
    return "\n".join(
        [
            "# Deep thin plain networks",
            "",
            f"Written by `{_command(settings)}` ({'quick mode: a smoke test' if settings['quick'] else 'full mode'})"  # noqa: E501
            f" on {m['date (UTC)']} at commit {m['commit']}, {m['cpu']}, "
            f"{settings['threads']} torch thread, {raw['seconds'] / 60:.1f} min{_rendered(raw)}. "
            "Every number "
            "and sentence below is computed from this run (raw values in `deep.json`).",
            *_stopped(raw),
            "",
            f"FitNet-style plain networks (3x3 convs and ReLU in three stages of widths "
            f"{w[0]}, {w[1]}, {w[2]}, a 2x2 max pool after each, then a linear layer of "
            f"{settings['hidden']} and the classifier; no normalization, no skip connection) "
            f"of depth {', '.join(map(str, settings['depths']))} (weight layers), on MNIST and "
            f"Fashion-MNIST resized to {settings['size']}x{settings['size']}. Data-driven inits "
            f"see the {raw['train_count']} training samples the minibatches are drawn from "
            f"({settings['steps'] * settings['batch']} drawn in a run); test accuracy "
            f"is over {raw['test_count']} test samples. Each init is trained with SGD "
            f"(momentum {settings['momentum']}, minibatch {settings['batch']}, no weight "
            f"decay, no schedule) for {settings['steps']} steps at every learning rate of the "
            f"grid {', '.join(map(str, lrs))}, seeds {', '.join(map(str, settings['seeds']))}. "
            "The best rate per init is the one with the lowest mean training loss over the "
            "last window (a rate where any seed diverged never wins); the test split plays "
            "no part in choosing it. *Steps to below chance*: the first step at which the "
            f"mean loss of the last {RUNNING} steps is below 0.95 ln 10 = {STARTED:.3f} "
            "(median over the seeds that got there); *never started*: runs that did not, "
            "within the budget, and did not diverge; *diverged*: a non-finite loss (scored "
            "as 10 % accuracy); *collapsed*: runs that got below chance, then ended at "
            f"{100 * COLLAPSED:.0f} % test accuracy or less.",
            "",
            table(header, rows, right=3),
            "",
            plot,
            "",
            *_findings(b, settings),
            "",
            "The whole grid (mean test accuracy over seeds; diverged and never-started runs):",
            "",
            table(grid_header, grid_rows, right=3),
        ]
    )


def _command(settings: dict) -> str:
    """The command line that reproduces these settings (paths left out)."""
    default = DeepSettings.make(settings["quick"]).record()
    flags = ["--quick"] if settings["quick"] else []
    if settings["steps"] != default["steps"]:
        flags.append(f"--steps {settings['steps']}")
    if list(settings["seeds"]) != list(default["seeds"]):
        flags.append(f"--seeds {len(settings['seeds'])}")
    return " ".join(["python benchmarks/deep.py", *flags, "--write"])


def _findings(b: dict, settings: dict) -> list[str]:
    lines = ["What it shows:", ""]
    verdicts: dict[str, list[str]] = {"ahead": [], "within": [], "behind": []}
    sample_wins: list[str] = []
    for d in DATASETS:
        for depth in settings["depths"]:
            inits = [i for (dd, dp, i) in b if dd == d and dp == depth]
            if not inits:  # a run stopped before it
                continue
            s = {i: b[d, depth, i] for i in inits}
            ranked = sorted(inits, key=lambda i: -s[i]["acc_mean"])
            ours = [i for i in inits if i.startswith("ours")]
            others = [i for i in inits if i not in ours]
            line = f"- {d}, depth {depth}: highest mean test accuracy `{ranked[0]}` " \
                   f"({_pct(s[ranked[0]]['acc_mean'])} %), lowest `{ranked[-1]}` " \
                   f"({_pct(s[ranked[-1]]['acc_mean'])} %)."  # fmt: skip
            if ours and others:
                bo = min(ours, key=ranked.index)
                bx = min(others, key=ranked.index)
                gap = 100 * (s[bo]["acc_mean"] - s[bx]["acc_mean"])
                se = 100 * math.sqrt(
                    s[bo]["acc_std"] ** 2 / s[bo]["seeds"] + s[bx]["acc_std"] ** 2 / s[bx]["seeds"]
                )
                line += (
                    f" Our best, `{bo}`, is {abs(gap):.2f} points "
                    f"{'ahead of' if gap >= 0 else 'behind'} the best other init `{bx}`"
                )
                if min(s[bo]["seeds"], s[bx]["seeds"]) > 1:
                    noise = abs(gap) <= 2 * se
                    line += (
                        f" (standard error of the difference {se:.2f}: "
                        f"{'within' if noise else 'beyond'} two standard errors)."
                    )
                    where = "within" if noise else ("ahead" if gap > 0 else "behind")
                    verdicts[where].append(f"{d} depth {depth}")
                else:
                    line += " (one seed: no spread to compare with)."
            dead = [
                i for i in inits if s[i]["never_started"] + s[i]["diverged"] + s[i]["collapsed"]
            ]
            if dead:
                failed = {
                    i: s[i]["never_started"] + s[i]["diverged"] + s[i]["collapsed"] for i in dead
                }
                line += (
                    " Runs that never started, diverged or collapsed at the best rate: "
                    + ", ".join(f"`{i}` {k}/{s[i]['seeds']}" for i, k in failed.items())
                    + "."
                )
            else:
                line += (
                    " Every run of every init started, none diverged or collapsed at its best rate."
                )
            fast = [i for i in inits if s[i]["started_median"] is not None]
            if fast:
                first = min(fast, key=lambda i: s[i]["started_median"])
                line += (
                    f" Fewest steps to below chance: `{first}` "
                    f"({s[first]['started_median']:.0f}); "
                    + ", ".join(f"`{i}` {_started(s[i])}" for i in ours)
                    + "."
                )
            full = [i for i in ("ours-tensor", "ours-channel") if i in s]
            sampled = [i for i in ours if i not in full]
            if full and sampled:
                f_acc = max(s[i]["acc_mean"] for i in full)
                sm_acc = max(s[i]["acc_mean"] for i in sampled)
                line += (
                    f" Full split against a random sample (best of each): "
                    f"{_pct(f_acc)} % against {_pct(sm_acc)} % "
                    f"({100 * (f_acc - sm_acc):+.2f} points)."
                )
                if sm_acc > f_acc:
                    sample_wins.append(f"{d} depth {depth}")
            lines.append(line)
    judged = sum(len(v) for v in verdicts.values())
    if judged:
        lines.append(
            f"- Overall, over the {judged} (dataset, depth) settings with several seeds: our "
            f"best init is ahead of the best other init by more than two standard errors in "
            f"{len(verdicts['ahead'])} ({', '.join(verdicts['ahead']) or 'none'}), within two "
            f"standard errors in {len(verdicts['within'])} "
            f"({', '.join(verdicts['within']) or 'none'}) and behind by more in "
            f"{len(verdicts['behind'])} ({', '.join(verdicts['behind']) or 'none'}). A random "
            f"1k or 10k sample scores higher (mean over seeds) than the full split in "
            f"{len(sample_wins)} ({', '.join(sample_wins) or 'none'}): there, at this "
            "budget, the exactness of the full-split statistics bought no accuracy."
            if sample_wins
            else f"- Overall, over the {judged} (dataset, depth) settings with several seeds: "
            f"our best init is ahead of the best other init by more than two standard errors "
            f"in {len(verdicts['ahead'])}, within two in {len(verdicts['within'])}, behind by "
            f"more in {len(verdicts['behind'])}; the full split scores at least as high as "
            "its best random sample in every setting."
        )
    return lines


def _plot(plt, raw: dict, b: dict):
    settings = raw["settings"]
    depths = settings["depths"]
    fig, axes = plt.subplots(len(DATASETS), len(depths), figsize=(6 * len(depths), 8),
                             squeeze=False)  # fmt: skip
    for row, d in enumerate(DATASETS):
        for col, depth in enumerate(depths):
            ax = axes[row][col]
            for n, init in enumerate(settings["inits"]):
                if (d, depth, init) not in b:  # a run stopped before it
                    continue
                lr = b[d, depth, init]["lr"]
                curves = [r["curve"] for r in raw["runs"] if (r["dataset"], r["depth"],
                          r["init"], r["lr"]) == (d, depth, init, lr)]  # fmt: skip
                length = min(len(c) for c in curves)
                window = raw["runs"][0]["window"]
                mean = [statistics.fmean(c[k] for c in curves) for k in range(length)]
                steps = [(k + 1) * window for k in range(length)]
                style = "-" if init.startswith("ours") else "--"
                ax.plot(steps, mean, style, color=f"C{n % 10}", lw=1.2,
                        label=f"{init} (lr {lr})")  # fmt: skip
            ax.axhline(CHANCE, color="black", lw=0.8)
            ax.set_yscale("log")
            ax.set_title(f"{d}, depth {depth}: training loss at the best lr")
            ax.set_xlabel("SGD step")
            if ax.lines[1:]:  # more than the chance line
                ax.legend(fontsize=6)
    fig.suptitle("Training loss, mean over seeds (black: ln 10, equal logits)")
    fig.subplots_adjust(hspace=0.3)
    return fig


def _stopped(raw: dict) -> list[str]:
    """A paragraph on what did not run, for a report from a run stopped early."""
    if not raw.get("partial"):
        return []
    s = raw["settings"]
    planned = len(DATASETS) * len(s["depths"]) * len(s["inits"]) * len(s["seeds"])
    done = len(raw["runs"]) // len(s["lrs"])
    seeds = sorted({r["seed"] for r in raw["runs"]})
    return [
        "",
        f"**This run was stopped before it finished** (time limit on a shared machine): "
        f"{done} of {planned} (dataset, depth, init, seed) configurations ran, seeds "
        f"{', '.join(map(str, seeds))} begun, seeds the outer loop; the tables count, per "
        "row, the seeds that ran (the *started* / *diverged* columns say how many).",
    ]


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
@click.option("--write", is_flag=True, help="Write deep.md, deep.json and deep.png "
              "(and deep.partial.json, the runs so far, while it runs).")  # fmt: skip
@click.option("--out", type=click.Path(file_okay=False, path_type=Path),
              help="Where --write writes [default: benchmarks/, or quick/ in it].")  # fmt: skip
@click.option("--seeds", type=click.IntRange(min=1), help="Seeds 0..N-1.")
@click.option("--steps", type=click.IntRange(min=1), help="SGD steps per run.")
@click.option(
    "--render",
    "render_from",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="Measure nothing: write deep.md and deep.png from this deep.json or "
    "deep.partial.json (into --out, or its folder).",
)
def main(quick, data_root, write, out, seeds, steps, render_from):
    """Train deep thin plain networks from each init; write deep.md and its plot."""
    if render_from is not None:
        raw = json.loads(render_from.read_text())
        raw["rendered"] = _machine()["commit"]  # the report's text, from the same numbers
        raw["partial"] = render_from.name == "deep.partial.json"
        out = (out or render_from.parent).resolve()
        out.mkdir(parents=True, exist_ok=True)
        (out / "deep.md").write_text(render(raw, out) + "\n")
        click.echo(out / "deep.md")
        return
    overrides = {}
    if seeds is not None:
        overrides["seeds"] = tuple(range(seeds))
    if steps is not None:
        overrides["steps"] = steps
    settings = DeepSettings.make(quick, **overrides)
    out = (out or REPO / "benchmarks" / ("quick" if quick else "")).resolve()
    t = time.perf_counter()
    raw = {"machine": _machine(), "settings": settings.record()}

    def partial(result: dict) -> None:
        seconds = time.perf_counter() - t
        (out / "deep.partial.json").write_text(json.dumps({**raw, **result, "seconds": seconds}))

    if write:
        out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="lsuv-deep-") as work:
        raw.update(measure(settings, data_root.resolve(), Path(work), partial if write else None))
    raw["seconds"] = time.perf_counter() - t
    raw["machine"]["load average at end"] = load_average()
    if not write:
        click.echo(render(raw, None))
        return
    (out / "deep.json").write_text(json.dumps(raw, indent=1))
    (out / "deep.md").write_text(render(raw, out) + "\n")
    (out / "deep.partial.json").unlink()
    click.echo(out / "deep.md")


if __name__ == "__main__":
    main()
