"""Section 1, cost: a solve's wall time in units of one plain forward pass, and its memory.

Each run is a fresh process (``probe.py``) that times the solve and then, seconds later in
the same process, one no-grad forward pass over the same split at the same batch size; the
ratio of the two is the run's cost. Methods take turns within a repeat (the order rotates
from one repeat to the next) and the table shows the median over repeats.

A second table does the same for torchvision's resnet18 on a Fashion-MNIST subset, with the
activation cache on and off, and checks that both wrote the same store, byte for byte.
"""

from __future__ import annotations

from pathlib import Path

from .common import Settings, figure, log, median, probe_spec, run_probe, table
from .probe import METHODS

LABELS = {
    "forward": "one no-grad forward pass (reference: its ratio is the noise)",
    "forward-moments": "one forward pass reducing every layer's output to moments (a floor)",
    "ours-tensor": "ours, tensor mode, full split, activation cache (the default)",
    "ours-nocache": "ours, tensor mode, full split, no cache: early exit per layer",
    "naive-full": "naive full-split solve: whole model per layer, .item() per batch",
    "pypi-lsuv-256": "PyPI lsuv 0.3.0 (lsuv_with_singlebatch), one batch of 256",
    "seed-lsuv-256": "one-batch LSUV, seed write-up, one batch of 256",
}


#: The deep-network comparison: torchvision resnet18 on a Fashion-MNIST subset.
RESNET = {"model": "resnet18", "dataset": "fashion-mnist"}
RESNET_METHODS = ("forward", "ours-tensor", "ours-nocache")


def _rotating(methods: tuple[str, ...], repeats: int, what: str, spec: dict, threads: int):
    runs: dict[str, list[dict]] = {m: [] for m in methods}
    for r in range(repeats):
        for method in methods[r % len(methods) :] + methods[: r % len(methods)]:
            log(f"cost: {what}, repeat {r + 1}/{repeats}, {method}")
            runs[method].append(run_probe({**spec, "method": method}, threads))
    return runs


def measure(settings: Settings) -> dict:
    spec = probe_spec(settings)
    runs = _rotating(METHODS, settings.repeats, "mnist mj", spec, settings.threads)
    deep = {**spec, **RESNET, "limit": settings.resnet_limit}
    resnet = _rotating(RESNET_METHODS, settings.repeats, "resnet18", deep, settings.threads)
    return {"runs": runs, "resnet": {"runs": resnet, **RESNET, "limit": settings.resnet_limit}}


def summary(runs_by_method: dict[str, list[dict]]) -> dict[str, dict]:
    """Per method: median ratio, its range, medians of seconds and memory."""
    out = {}
    for method, runs in runs_by_method.items():
        ratios = [r["solve_s"] / r["forward_s"] for r in runs]
        out[method] = {
            "ratio": median(ratios),
            "ratio_min": min(ratios),
            "ratio_max": max(ratios),
            "runs": len(runs),
            "solve_s": median([r["solve_s"] for r in runs]),
            "forward_s": median([r["forward_s"] for r in runs]),
            "peak": median([r["peak_rss_mib"] for r in runs]),
            "reset": all(r["peak_reset"] for r in runs),
            "above": median([r["peak_rss_mib"] - r["base_rss_mib"] for r in runs]),
            "count": runs[0]["count"],
            "passes": runs[0].get("passes"),
            "digests": sorted({r["digest"] for r in runs if "digest" in r}),
        }
    return out


def _table(s: dict[str, dict], column: str) -> str:
    """The per-method table; ``column`` is ``"peak RSS MiB"`` or ``"passes"``."""
    header = ["method", "what", "solve / forward (median)", "range", "runs",
              "solve s (median)", column, "peak above baseline MiB"]  # fmt: skip
    rows = []
    for m, v in s.items():
        if column == "passes":
            extra = "" if v["passes"] is None else v["passes"]
        else:
            extra = f"{v['peak']:.0f}"
        rows.append([f"`{m}`", LABELS[m], f"{v['ratio']:.3g}",
                     f"{v['ratio_min']:.3g}–{v['ratio_max']:.3g}", v["runs"],
                     f"{v['solve_s']:.2f}", extra, f"{v['above']:.1f}"])  # fmt: skip
    return table(header, rows, right=2)


def memory_note(reset: bool) -> str:
    """How peak memory was measured, for the section text."""
    how = (
        "reset to the current RSS just before the solve (by writing 5 to "
        "`/proc/self/clear_refs`), so the transient peaks of importing torch and decoding "
        "the data do not count"
        if reset
        else "not resettable here, so the baseline is the peak before the solve"
    )
    return (
        "Peak memory is the process's peak resident set size (`VmHWM` in "
        "`/proc/self/status` on Linux, else `ru_maxrss`), read right after the solve; that "
        f"high-water mark was {how}. The baseline is the RSS just before the solve (Python, "
        "torch, the decoded split and the model, after a one-batch warm-up): *peak above "
        "baseline* is what the solve itself added."
    )


def render(results: dict, settings: Settings, out: Path) -> str:
    s = summary(results["runs"])
    memory = memory_note(all(v["reset"] for v in s.values()))
    ours, nocache, naive = s["ours-tensor"], s["ours-nocache"], s["naive-full"]
    pypi, seed = s["pypi-lsuv-256"], s["seed-lsuv-256"]
    noise, floor = s["forward"], s["forward-moments"]
    plot = figure(out / "cost.png", lambda plt: _plot(plt, s))
    return "\n".join(
        [
            "## 1. Cost",
            "",
            f"MNIST training split ({ours['count']} samples), model `mj`, CPU, batch size "
            f"{settings.batch_size} for every method and for the reference forward pass, "
            f"{settings.threads} torch thread(s), final verification pass off. Each run is a "
            "fresh process that times the solve, then one plain `torch.no_grad()` forward "
            "pass over the same split; **solve / forward** is their ratio in that process, "
            f"median over {ours['runs']} run(s), range = min–max. {memory}",
            "",
            _table(s, "peak RSS MiB"),
            "",
            plot,
            "",
            "What it shows:",
            "",
            f"- Our full-split solve costs {ours['ratio']:.3g} forward passes with the "
            f"activation cache ({ours['passes']} passes, one per layer, each computing only "
            f"the operations from the cached cut to its layer) and {nocache['ratio']:.3g} "
            "without it (every pass recomputes the layers before its own, stopping right "
            f"after it): the cache saves {1 - ours['ratio'] / nocache['ratio']:.0%} of the "
            f"time. {_same(ours, nocache)} The naive full-split solve costs "
            f"{naive['ratio']:.3g}: {naive['ratio'] / ours['ratio']:.3g}x ours, for the same "
            "statistics.",
            f"- A floor: one forward pass that reduces every layer's output to per-channel "
            "moments on the way (the pipeline's verification pass, all layers at once) "
            f"costs {floor['ratio']:.3g}. An exact full-split solve computes every layer's "
            "output over the split and reduces it at least once, so with these kernels it "
            f"cannot cost less; ours spends {ours['ratio'] - floor['ratio']:.2g} forward "
            "passes more, on mapping each solved layer's cached output through its update, "
            f"writing and re-reading the cut ({ours['above']:.0f} MiB of new memory, first "
            "touched during the solve) and recording each shard.",
            f"- The one-batch inits cost {pypi['ratio']:.3g} (PyPI lsuv) and "
            f"{seed['ratio']:.3g} (seed write-up) forward passes over the split; ours costs "
            f"{ours['ratio'] / pypi['ratio']:.3g}x and {ours['ratio'] / seed['ratio']:.3g}x "
            "as much: they look at 256 samples, not at all of them.",
            f"- Memory: the solve raised the process's peak by {ours['above']:.1f} MiB for "
            f"ours, {naive['above']:.1f} MiB for the naive solve, {pypi['above']:.1f} MiB for "
            f"PyPI lsuv and {seed['above']:.1f} MiB for the seed write-up, over a baseline "
            f"of about {ours['peak'] - ours['above']:.0f} MiB (Python, torch, the split).",
            f"- Noise: two identical forward passes in one process differed by a factor "
            f"{noise['ratio_min']:.3g}–{noise['ratio_max']:.3g} across runs.",
            "",
            *_resnet(results["resnet"], settings, memory),
        ]
    )


def _same(a: dict, b: dict) -> str:
    """Whether every run of two methods wrote the same store, in words."""
    if len(a["digests"]) == 1 and a["digests"] == b["digests"]:
        return (
            f"All {a['runs'] + b['runs']} runs, cache on and off, wrote the same store, "
            "byte for byte (SHA-256 over every array)."
        )
    return (
        "**The stores differ** between runs or between cache on and off "
        f"({len(set(a['digests']) | set(b['digests']))} distinct SHA-256 digests)."
    )


def _resnet(results: dict, settings: Settings, memory: str) -> list[str]:
    s = summary(results["runs"])
    cached, nocache = s["ours-tensor"], s["ours-nocache"]
    return [
        "### A deep network: resnet18, cache on and off",
        "",
        f"torchvision `{results['model']}` (its stem adapted to one input channel, 10 "
        f"classes) on the first {cached['count']} images of the {results['dataset']} "
        "training split, everything else as above: each run a fresh process, the ratio "
        "against one plain forward pass over the same images in that process, medians over "
        f"{cached['runs']} run(s).",
        "",
        _table(s, "passes"),
        "",
        f"- With the cache the solve of its {cached['passes']} layers costs "
        f"{cached['ratio']:.3g} forward passes; without it {nocache['ratio']:.3g} "
        f"({nocache['ratio'] / cached['ratio']:.3g}x as much). {_same(cached, nocache)}",
        f"- The cache's memory: {cached['above']:.1f} MiB above the baseline with it, "
        f"{nocache['above']:.1f} MiB without it.",
    ]


def _plot(plt, s: dict):
    fig, ax = plt.subplots(figsize=(7, 3))
    names = list(s)[::-1]
    med = [s[n]["ratio"] for n in names]
    err = [[s[n]["ratio"] - s[n]["ratio_min"] for n in names],
           [s[n]["ratio_max"] - s[n]["ratio"] for n in names]]  # fmt: skip
    ax.barh(names, med, xerr=err, color="tab:blue", alpha=0.8)
    ax.set_xscale("log")
    ax.set_xlabel("solve wall time / one forward pass over the split (median, min–max)")
    ax.set_title("Cost of the init, MNIST, mj")
    return fig
