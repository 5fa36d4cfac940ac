"""Section 1, cost: a solve's wall time in units of one plain forward pass, and its memory.

Each run is a fresh process (``probe.py``) that times the solve and then, seconds later in
the same process, one no-grad forward pass over the same split at the same batch size; the
ratio of the two is the run's cost. Methods take turns within a repeat (the order rotates
from one repeat to the next) and the table shows the median over repeats.
"""

from __future__ import annotations

from pathlib import Path

from .common import Settings, figure, log, median, run_probe, table
from .probe import METHODS

LABELS = {
    "forward": "one no-grad forward pass (reference: its ratio is the noise)",
    "ours-tensor": "ours, tensor mode: full split, early exit per layer",
    "naive-full": "naive full-split solve: whole model per layer, .item() per batch",
    "pypi-lsuv-256": "PyPI lsuv 0.3.0 (lsuv_with_singlebatch), one batch of 256",
    "seed-lsuv-256": "one-batch LSUV, seed write-up, one batch of 256",
}


def measure(settings: Settings) -> dict:
    runs: dict[str, list[dict]] = {m: [] for m in METHODS}
    for r in range(settings.repeats):
        order = METHODS[r % len(METHODS) :] + METHODS[: r % len(METHODS)]
        for method in order:
            log(f"cost: repeat {r + 1}/{settings.repeats}, {method}")
            spec = {
                "method": method,
                "dataset": "mnist",
                "data_root": str(settings.data_root),
                "limit": settings.limit,
                "batch_size": settings.batch_size,
                "threads": settings.threads,
                "work": str(settings.work),
                "forward": True,
            }
            runs[method].append(run_probe(spec, settings.threads))
    return {"runs": runs}


def summary(results: dict) -> dict[str, dict]:
    """Per method: median ratio, its range, medians of seconds and memory."""
    out = {}
    for method, runs in results["runs"].items():
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
        }
    return out


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
    s = summary(results)
    memory = memory_note(all(v["reset"] for v in s.values()))
    rows = [
        [
            f"`{m}`",
            LABELS[m],
            f"{v['ratio']:.3g}",
            f"{v['ratio_min']:.3g}–{v['ratio_max']:.3g}",
            v["runs"],
            f"{v['solve_s']:.2f}",
            f"{v['peak']:.0f}",
            f"{v['above']:.1f}",
        ]
        for m, v in s.items()
    ]
    header = [
        "method",
        "what",
        "solve / forward (median)",
        "range",
        "runs",
        "solve s (median)",
        "peak RSS MiB",
        "peak above baseline MiB",
    ]
    ours, naive = s["ours-tensor"], s["naive-full"]
    pypi, seed = s["pypi-lsuv-256"], s["seed-lsuv-256"]
    noise = s["forward"]
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
            table(header, rows, right=2),
            "",
            plot,
            "",
            "What it shows:",
            "",
            f"- Our full-split solve costs {ours['ratio']:.3g} forward passes "
            f"({ours['passes']} passes, one per layer, each stopped after its layer). The "
            f"naive full-split solve costs {naive['ratio']:.3g}: "
            f"{naive['ratio'] / ours['ratio']:.3g}x ours, for the same statistics.",
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
        ]
    )


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
