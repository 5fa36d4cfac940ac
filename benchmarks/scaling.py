"""Section 4, scaling: solve time and peak memory against training-set size; inline vs dask.

The training set grows by repetition (1x, 2x, 4x of MNIST's training split, sample ``i``
is sample ``i % 60000``) without copying it, so the data's memory stays that of one copy
and any growth in peak memory would be the solve's own. Both ways of running a pass are
measured: streaming (``--no-cache``: memory flat by construction) and with the activation
cache (memory grows with the data up to the cache's budget, then shards are recomputed).
Each measurement is a fresh process (``probe.py``) that also times one forward pass over
one copy of the split right after the solve: the solve's time in those units does not move
with the machine's load the way seconds do (a solve of minutes on a shared machine).
Linear scaling means k copies cost k times the units of one copy.

Dask: the same solve at 1x with ``compute(..., workers=N)``, inline and dask side by side.
"""

from __future__ import annotations

from pathlib import Path

from .common import Settings, figure, log, median, probe_spec, run_probe, table


def _spec(settings: Settings, **kw) -> dict:
    return probe_spec(settings, **{"method": "ours-tensor", **kw})


#: How a pass runs -> the probe method.
HOW = {"streaming": "ours-nocache", "cached": "ours-tensor"}


def measure(settings: Settings) -> dict:
    sizes = {how: {k: [] for k in settings.scales} for how in HOW}
    for r in range(settings.repeats):
        n = len(settings.scales)
        for k in settings.scales[r % n :] + settings.scales[: r % n]:
            for how, method in HOW.items():
                log(f"scaling: repeat {r + 1}/{settings.repeats}, {k}x, {how}")
                spec = _spec(settings, repeat=k, method=method)
                sizes[how][k].append(run_probe(spec, settings.threads))
    runs = {"inline": [], "dask": []}
    for r in range(settings.repeats):
        for how in ("inline", "dask") if r % 2 == 0 else ("dask", "inline"):
            log(f"scaling: repeat {r + 1}/{settings.repeats}, {how}")
            workers = settings.workers if how == "dask" else None
            spec = _spec(settings, serve=False, workers=workers)
            runs[how].append(run_probe(spec, settings.threads))
    return {
        "sizes": {how: {str(k): v for k, v in by.items()} for how, by in sizes.items()},
        "dask_runs": runs,
    }


def summary(by_size: dict) -> dict[int, dict]:
    sizes = {int(k): v for k, v in by_size.items()}
    one = min(sizes)

    def units(run: dict) -> float:  # solve time in forward passes over one copy
        return run["solve_s"] / run["forward_s"]

    out = {}
    for k, runs in sizes.items():
        # per sample relative to the smallest size, within each repeat (side by side)
        rel = [(units(r) / k) / (units(b) / one) for r, b in zip(runs, sizes[one], strict=True)]
        out[k] = {
            "count": runs[0]["count"],
            "solve_s": median([r["solve_s"] for r in runs]),
            "units": median([units(r) for r in runs]),
            "units_min": min(units(r) for r in runs),
            "units_max": max(units(r) for r in runs),
            "per_sample": median(rel),
            "per_sample_min": min(rel),
            "per_sample_max": max(rel),
            "peak": median([r["peak_rss_mib"] for r in runs]),
            "above": median([r["peak_rss_mib"] - r["base_rss_mib"] for r in runs]),
            "runs": len(runs),
        }
    return out


def render(results: dict, settings: Settings, out: Path) -> str:
    per = {how: summary(by) for how, by in results["sizes"].items()}
    s = per["streaming"]
    one, big = min(s), max(s)
    rows = [
        [
            how,
            f"{k}x",
            v["count"],
            f"{v['solve_s']:.1f}",
            f"{v['units']:.2f} ({v['units_min']:.2f}–{v['units_max']:.2f})",
            f"{v['per_sample']:.2f} ({v['per_sample_min']:.2f}–{v['per_sample_max']:.2f})",
            f"{v['peak']:.0f}",
            f"{v['above']:.1f}",
        ]
        for how, sh in per.items()
        for k, v in sh.items()
    ]
    header = [
        "pass",
        "size",
        "samples",
        "solve s (median)",
        "solve / forward over one copy (median, range)",
        f"per sample, relative to {one}x (linear = 1.00)",
        "peak RSS MiB",
        "peak above baseline MiB",
    ]
    plot = figure(out / "scaling.png", lambda plt: _plot(plt, per))
    c = per["cached"]
    lines = [
        "## 4. Scaling",
        "",
        f"Ours, tensor mode, MNIST training split repeated {', '.join(f'{k}x' for k in s)} "
        "(no copy: the data's memory is one split's), passes *streaming* (`--no-cache`: "
        "each pass reads the data from the input, early exit after its layer) and *cached* "
        "(the default activation cache, default budget: half the free memory), batch size "
        f"{settings.batch_size}, {settings.threads} torch thread(s), verification off; one "
        f"fresh process per measurement, {s[one]['runs']} repeat(s), sizes side by side "
        "in each repeat. Time is counted in forward passes over one copy of the split, "
        "timed in the same process right after the solve, so that a change in the shared "
        "machine's load between measurements cancels out: linear scaling means k copies "
        "take k times as many. *Per sample* divides that by k and by the same repeat's "
        f"{one}x value. Peak RSS and baseline as in section 1.",
        "",
        table(header, rows),
        "",
        plot,
        "",
        "What it shows:",
        "",
        f"- Streaming: per sample, the solve at {big}x cost {s[big]['per_sample']:.2f} times "
        f"what it cost at {one}x (range {s[big]['per_sample_min']:.2f}–"
        f"{s[big]['per_sample_max']:.2f}; 1.00 is linear). In seconds, {big}x took "
        f"{s[big]['solve_s'] / s[one]['solve_s']:.2f}x as long as {one}x (medians). Its "
        f"addition to peak memory was {s[one]['above']:.1f} MiB at {one}x and "
        f"{s[big]['above']:.1f} MiB at {big}x ({s[big]['above'] - s[one]['above']:+.1f} MiB).",
        f"- Cached: {c[one]['units']:.2f} forward passes at {one}x against "
        f"{s[one]['units']:.2f} streaming. The cache holds the activations at the cut, so "
        f"its memory grows with the data: {c[one]['above']:.0f} MiB above the baseline at "
        f"{one}x, {c[big]['above']:.0f} MiB at {big}x, bounded by its budget (half the "
        "free memory; shards past it are recomputed from the input in every pass, with the "
        "same result). Its per-sample cost also grows: "
        + ", ".join(f"{c[k]['per_sample']:.2f}x at {k}x" for k in sorted(c) if k != one)
        + f" relative to {one}x. For a training set that does not fit the budget, the "
        "streaming pass is the one with linear time and flat memory.",
        "",
        "### Inline vs dask workers",
        "",
    ]
    return "\n".join(lines + _dask(results, settings))


def _dask(results: dict, settings: Settings) -> list[str]:
    runs = results["dask_runs"]
    ratios = [
        (d["solve_s"] / d["forward_s"]) / (i["solve_s"] / i["forward_s"])
        for d, i in zip(runs["dask"], runs["inline"], strict=True)
    ]
    seconds = [
        d["solve_s"] / i["solve_s"] for d, i in zip(runs["dask"], runs["inline"], strict=True)
    ]
    rows = []
    for how in ("inline", "dask"):
        rs = runs[how]
        rows.append(
            [
                how if how == "inline" else f"{settings.workers} dask workers",
                f"{median([r['solve_s'] for r in rs]):.1f}",
                f"{median([r['solve_s'] / r['forward_s'] for r in rs]):.2f}",
                "1.00" if how == "inline" else f"{median(ratios):.2f}",
                "1.00" if how == "inline" else f"{median(seconds):.2f}",
                f"{median([r['peak_rss_mib'] for r in rs]):.0f}",
            ]
        )
    header = [
        "executor",
        "solve s (median)",
        "solve / forward (median)",
        "time / inline, in forward passes (median)",
        "time / inline, in seconds (median)",
        "peak RSS MiB",
    ]
    return [
        f"1x, via `compute(..., workers=N)`, {len(ratios)} repeat(s), inline and dask side by "
        "side in each; both open the data themselves. Time in forward passes as above "
        f"(the forward runs inline in the coordinating process, {settings.threads} "
        "thread(s)); *time / inline* compares the two within each repeat. Peak RSS is the "
        "coordinating process's only: the workers' memory is not measured here.",
        "",
        table(header, rows),
        "",
        f"- {settings.workers} dask workers took {median(ratios):.2f}x the inline time counted "
        f"in forward passes (range {min(ratios):.2f}–{max(ratios):.2f}) and "
        f"{median(seconds):.2f}x in seconds (range {min(seconds):.2f}–{max(seconds):.2f}), "
        f"on {settings.threads} torch thread(s) per process either way: the workers split "
        "each pass's shards between them, and pay for sending the weights once per pass "
        "and a task per shard (the cluster's start is not counted in either).",
    ]


def _plot(plt, per: dict):
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.6))
    ks = sorted(per["streaming"])
    for how, s in per.items():
        line = a.plot(ks, [s[k]["units"] for k in ks], "o-", label=f"{how} (median)")
        a.plot(ks, [s[ks[0]]["units"] * k / ks[0] for k in ks], "--", lw=0.8,
               color=line[0].get_color(), label=f"{how}, linear from 1x")  # fmt: skip
        b.plot(ks, [s[k]["peak"] for k in ks], "o-", label=f"peak RSS, {how}")
    a.set_xlabel("training-set size (copies of the split)")
    a.set_ylabel("solve time / forward over one copy")
    a.set_xticks(ks)
    a.legend(fontsize=8)
    base = per["streaming"]
    b.plot(ks, [base[k]["peak"] - base[k]["above"] for k in ks], "s--", label="baseline")
    b.set_xlabel("training-set size (copies of the split)")
    b.set_ylabel("MiB")
    b.set_xticks(ks)
    b.set_ylim(bottom=0)
    b.legend()
    fig.suptitle("Scaling of our solve with the training-set size")
    return fig
