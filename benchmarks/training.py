"""Section 3, training: MJ trained from each init on MNIST and Fashion-MNIST.

Every (dataset, init, seed) is one run: MJ under ``seed``, the init (data-driven ones on
that dataset's training split), then plain SGD with a fixed learning rate, momentum and
minibatch size for a fixed number of epochs, the minibatch order drawn from ``seed``. The
training loss is logged as its mean over windows of steps; test accuracy is measured over
the whole test split at the end. Runs go to a pool of ``settings.jobs`` worker processes
(fresh interpreters, one torch thread each); a run's numbers do not depend on which worker
ran it or when.
"""

from __future__ import annotations

import functools
import math
import multiprocessing
import statistics
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch
from torch.nn import functional as F

from .baselines import INITS, initialize
from .common import Settings, figure, labels, log, source, table

DATASETS = ("mnist", "fashion-mnist")
WINDOWS_PER_EPOCH = 20
NUM_CLASSES = 10  # MNIST and Fashion-MNIST alike
HYPER = ("threads", "train_batch", "epochs", "lr", "momentum")  # settings each run reads


@functools.lru_cache(maxsize=1)
def _data(name: str, root: str, limit: int | None):
    """The training source, its images and labels in memory, and the test split's."""
    train = source(name, "train", root, limit)
    test = source(name, "test", root, limit)
    return (
        train,
        train.batch(0, train.count),  # (N, 1, 28, 28) float32
        labels(name, "train", Path(root), train.count),
        test.batch(0, test.count),
        labels(name, "test", Path(root), test.count),
    )


def train_one(job: dict) -> dict:
    """Initialize and train one model; return its loss curve and test accuracy."""
    torch.set_num_threads(job["threads"])
    src, x, y, x_test, y_test = _data(job["dataset"], job["data_root"], job["limit"])
    model = initialize(job["init"], src, seed=job["seed"], work=Path(job["work"]))
    opt = torch.optim.SGD(model.parameters(), lr=job["lr"], momentum=job["momentum"])
    g = torch.Generator().manual_seed(job["seed"])
    bs = job["train_batch"]
    steps_per_epoch = math.ceil(x.shape[0] / bs)
    window = max(1, steps_per_epoch // WINDOWS_PER_EPOCH)
    curve, current, diverged = [], [], False
    model.train()
    for _ in range(job["epochs"]):
        order = torch.randperm(x.shape[0], generator=g)
        for start in range(0, x.shape[0], bs):
            idx = order[start : start + bs]
            loss = F.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            current.append(loss.item())
            if not math.isfinite(current[-1]):
                diverged = True
                break
            if len(current) == window:
                curve.append(statistics.fmean(current))
                current = []
        if diverged:
            curve.append(statistics.fmean(current))  # ends in the non-finite value
            break
    model.eval()
    with torch.no_grad():
        correct = sum(
            (model(x_test[s : s + 1000]).argmax(1) == y_test[s : s + 1000]).sum().item()
            for s in range(0, x_test.shape[0], 1000)
        )
    return {
        **{k: job[k] for k in ("dataset", "init", "seed")},
        "window": window,
        "curve": curve,
        "diverged": diverged,
        "test_acc": correct / x_test.shape[0],
        "steps": job["epochs"] * steps_per_epoch,
    }


def measure(settings: Settings) -> dict:
    jobs = [
        {
            "dataset": d,
            "init": i,
            "seed": s,
            "data_root": str(settings.data_root),
            "limit": settings.limit,
            "work": str(settings.work),
            **{k: getattr(settings, k) for k in HYPER},
        }
        for d in DATASETS
        for s in settings.seeds
        for i in INITS
    ]
    runs = []
    ctx = multiprocessing.get_context("spawn")  # fresh interpreters: no forked torch state
    with ProcessPoolExecutor(max_workers=settings.jobs, mp_context=ctx) as pool:
        for n, run in enumerate(pool.map(train_one, jobs), 1):
            log(
                f"training {n}/{len(jobs)}: {run['dataset']} {run['init']} seed {run['seed']}: "
                f"test accuracy {run['test_acc']:.4f}"
            )
            runs.append(run)
    return {"runs": runs}


def summary(results: dict) -> dict[tuple[str, str], dict]:
    """Per (dataset, init): accuracy mean / std / min / max over seeds, and loss windows."""
    groups: dict[tuple[str, str], list[dict]] = {}
    for run in results["runs"]:
        groups.setdefault((run["dataset"], run["init"]), []).append(run)
    out = {}
    for key, runs in groups.items():
        acc = [r["test_acc"] for r in runs]
        out[key] = {
            "acc_mean": statistics.fmean(acc),
            "acc_std": statistics.stdev(acc) if len(acc) > 1 else 0.0,
            "acc_min": min(acc),
            "acc_max": max(acc),
            "first": statistics.fmean(r["curve"][0] for r in runs),
            "last": statistics.fmean(r["curve"][-1] for r in runs),
            "diverged": sum(r["diverged"] for r in runs),
            "seeds": len(runs),
            "window": runs[0]["window"],
        }
    return out


def render(results: dict, settings: Settings, out: Path) -> str:
    s = summary(results)
    rows = [
        [
            d,
            f"`{i}`",
            f"{100 * v['acc_mean']:.2f}",
            f"{100 * v['acc_std']:.2f}",
            f"{100 * v['acc_min']:.2f}–{100 * v['acc_max']:.2f}",
            f"{v['first']:.3f}",
            f"{v['last']:.4f}",
            f"{v['diverged']}/{v['seeds']}",
        ]
        for (d, i), v in s.items()
    ]
    window = next(iter(s.values()))["window"]
    header = [
        "dataset",
        "init",
        "test acc % (mean)",
        "std",
        "min–max",
        f"train loss, first {_steps(window)}",
        f"train loss, last {_steps(window)}",
        "diverged",
    ]
    plot = figure(out / "training.png", lambda plt: _plot(plt, results["runs"]))
    return "\n".join(
        [
            "## 3. Training",
            "",
            f"MJ from each init, {settings.epochs} epochs of SGD (learning rate {settings.lr}, "
            f"momentum {settings.momentum}, no weight decay, no schedule, minibatch "
            f"{settings.train_batch}, reshuffled every epoch), seeds "
            f"{', '.join(map(str, settings.seeds))} (each seeds the weights, the one-batch "
            "draw and the minibatch order). Test accuracy over the whole test split after "
            "the last step; mean, sample standard deviation and range over seeds. Training "
            f"loss is the mean over windows of {_steps(window)}, averaged over seeds. The "
            "same hyperparameters for every init: none was tuned for any init.",
            "",
            table(header, rows, right=2),
            "",
            plot,
            "",
            *_findings(s, results["runs"], settings),
        ]
    )


def _steps(n: int) -> str:
    return f"{n} step" + ("s" if n != 1 else "")


def _findings(s: dict, runs: list[dict], settings: Settings) -> list[str]:
    n = len(settings.seeds)
    lines = ["What it shows:", ""]
    for d in DATASETS:
        inits = [i for (dd, i) in s if dd == d]
        by_acc = sorted(inits, key=lambda i: -s[d, i]["acc_mean"])
        ours = [i for i in inits if i.startswith("ours")]
        best, best_ours = by_acc[0], min(ours, key=by_acc.index)
        other = next(i for i in by_acc if i not in ours)  # the best of the others
        gap = 100 * (s[d, best_ours]["acc_mean"] - s[d, other]["acc_mean"])
        se = 100 * math.sqrt((s[d, other]["acc_std"] ** 2 + s[d, best_ours]["acc_std"] ** 2) / n)
        line = (
            f"- {d}: highest mean test accuracy `{best}` ({100 * s[d, best]['acc_mean']:.2f} %);"
            " ours ranks "
            + " and ".join(
                f"{by_acc.index(i) + 1} (`{i}`, {100 * s[d, i]['acc_mean']:.2f} %)" for i in ours
            )
            + f" of {len(inits)}; lowest `{by_acc[-1]}` "
            f"({100 * s[d, by_acc[-1]]['acc_mean']:.2f} %). "
        )
        where = "ahead of" if gap >= 0 else "behind"
        line += (
            f"Our best, `{best_ours}`, is {abs(gap):.2f} points {where} the best other init, "
            f"`{other}`"
        )
        line += (
            f"; the standard error of that difference over {n} seeds is {se:.2f} points."
            if n > 1
            else " (one seed: no spread to compare with)."
        )
        last = min(inits, key=lambda i: s[d, i]["last"])
        line += (
            f" Lowest training loss in the last window: `{last}` ({s[d, last]['last']:.3f}); "
            + ", ".join(f"`{i}` {s[d, i]['last']:.3f}" for i in ours)
            + "."
        )
        first = max(inits, key=lambda i: s[d, i]["first"])
        line += (
            f" Highest loss in the first window: `{first}` ({s[d, first]['first']:.2f}; equal "
            f"logits score ln {NUM_CLASSES} = {math.log(NUM_CLASSES):.2f})."
        )
        worst = min((r for r in runs if r["dataset"] == d), key=lambda r: r["test_acc"])
        line += (
            f" Worst single run: `{worst['init']}` seed {worst['seed']} at "
            f"{100 * worst['test_acc']:.2f} % (chance is {100 / NUM_CLASSES:.0f} %)."
        )
        diverged = [i for i in inits if s[d, i]["diverged"]]
        if diverged:
            line += " Diverged (non-finite loss): " + ", ".join(f"`{i}`" for i in diverged) + "."
        lines.append(line)
    return lines


def _plot(plt, runs: list[dict]):
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for ax, d in zip(axes, DATASETS, strict=True):
        for n, init in enumerate(INITS):
            curves = [r["curve"] for r in runs if r["dataset"] == d and r["init"] == init]
            if not curves:
                continue
            length = min(len(c) for c in curves)
            t = torch.tensor([c[:length] for c in curves])  # (seeds, windows)
            steps = [(k + 1) * runs[0]["window"] for k in range(length)]
            color = f"C{n}"
            style = "-" if init.startswith("ours") else "--"
            ax.plot(steps, t.mean(0).tolist(), style, color=color, label=init, lw=1.2)
            ax.fill_between(steps, t.min(0).values.tolist(), t.max(0).values.tolist(),
                            color=color, alpha=0.15)  # fmt: skip
        ax.set_yscale("log")
        ax.set_title(f"{d}: training loss")
        ax.set_xlabel("SGD step")
    axes[0].set_ylabel("cross-entropy (window mean)")
    fig.suptitle("Training loss: line = mean over seeds, band = min–max over seeds")
    axes[1].legend(fontsize=8)
    return fig
