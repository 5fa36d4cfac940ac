"""Section 2, init quality: every layer's output mean and std after each init.

Each init starts from MJ under seed 0 and uses the MNIST training split where it uses data
(one random batch, or all of it). Then every conv / linear output is measured over the
whole training split and the whole test split in one pass each: per batch a two-pass
(centred) mean and sum of squares per channel inside a forward hook, merged over batches
with Chan's update (``lsuv_pipeline.moments.merge``, float64); then pooled over channels
(mean and std of the layer's whole output) and per channel (the spread of channel stds,
which channel mode equalizes and tensor mode does not).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from lsuv_pipeline import moments as mom

from .baselines import INITS, initialize
from .common import Settings, figure, log, source, table

SPLITS = ("train", "test")


def _batch_moments(out: torch.Tensor, channel_dim: int) -> mom.Moments:
    """Per-channel moments of one batch: mean, then the centred sum of squares (two-pass).

    The hooks and this reduction are written here, not taken from the pipeline, so the
    yardstick is not the code under test (only the merge is the pipeline's); on the CPU
    this is also several times faster than ``torch.var_mean``.
    """
    flat = out.detach().movedim(channel_dim, 0).reshape(out.shape[channel_dim], -1)  # (C, n)
    mean = flat.mean(dim=1)
    m2 = (flat - mean[:, None]).square().sum(dim=1)
    return mom.Moments(count=flat.shape[1], mean=mean.double(), m2=m2.double())


@torch.no_grad()
def layer_stats(model, src, batch_size: int = 1000) -> dict[str, dict[str, float]]:
    """Per layer: mean and std of its whole output over ``src``, and min / max channel std."""
    targets = {n: m for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))}
    acc = {name: mom.Moments.empty() for name in targets}

    def hook(name, dim):
        def f(module, inputs, out):
            acc[name] = mom.merge(acc[name], _batch_moments(out, dim))

        return f

    handles = [
        m.register_forward_hook(hook(n, -1 if isinstance(m, nn.Linear) else 1))
        for n, m in targets.items()
    ]
    try:
        model.eval()
        for start in range(0, src.count, batch_size):
            model(src.batch(start, min(start + batch_size, src.count)))
    finally:
        for h in handles:
            h.remove()
    out = {}
    for name, per_channel in acc.items():
        pooled = mom.reduce_channels(per_channel)
        out[name] = {
            "mean": pooled.mean.item(),
            "std": pooled.std.item(),
            "channel_std_min": per_channel.std.min().item(),
            "channel_std_max": per_channel.std.max().item(),
        }
    return out


def measure(settings: Settings) -> dict:
    torch.set_num_threads(settings.threads)
    srcs = {split: source("mnist", split, settings.data_root, settings.limit) for split in SPLITS}
    results = {"count": {k: v.count for k, v in srcs.items()}, "inits": {}}
    for name in INITS:
        log(f"quality: {name}")
        model = initialize(name, srcs["train"], seed=0, work=settings.work)
        results["inits"][name] = {split: layer_stats(model, srcs[split]) for split in SPLITS}
    return results


def worst(stats: dict[str, dict], key: str) -> float:
    """Largest abs(std - 1) (key "std") or abs(mean) (key "mean") over the layers."""
    if key == "std":
        return max(abs(v["std"] - 1) for v in stats.values())
    return max(abs(v["mean"]) for v in stats.values())


def render(results: dict, settings: Settings, out: Path) -> str:
    inits = results["inits"]
    rows = []
    for name, per_split in inits.items():
        for layer, tr in per_split["train"].items():
            te = per_split["test"][layer]
            rows.append(
                [
                    f"`{name}`",
                    layer,
                    f"{tr['mean']:+.2e}",
                    f"{tr['std']:.4f}",
                    f"{te['mean']:+.2e}",
                    f"{te['std']:.4f}",
                    f"{te['channel_std_min']:.3f}–{te['channel_std_max']:.3f}",
                ]
            )
    header = [
        "init",
        "layer",
        "mean train",
        "std train",
        "mean test",
        "std test",
        "channel std test (min–max)",
    ]
    summary_rows = [
        [
            f"`{name}`",
            INITS[name].label,
            f"{worst(s['train'], 'std'):.2e}",
            f"{worst(s['test'], 'std'):.2e}",
            f"{worst(s['train'], 'mean'):.2e}",
            f"{worst(s['test'], 'mean'):.2e}",
        ]
        for name, s in inits.items()
    ]
    summary_header = [
        "init",
        "what",
        "max abs(std−1) train",
        "max abs(std−1) test",
        "max abs(mean) train",
        "max abs(mean) test",
    ]
    plot = figure(out / "quality.png", lambda plt: _plot(plt, inits))
    count = results["count"]
    return "\n".join(
        [
            "## 2. Init quality",
            "",
            f"MJ built under seed 0, then each init (data-driven ones use the MNIST training "
            f"split: one random batch, or all {count['train']} samples for ours). Every "
            f"conv / linear output is then measured over the whole training split "
            f"({count['train']} samples) and the whole test split ({count['test']}): mean "
            "and std of the layer's output pooled over samples, positions and channels. "
            "Ours is solved on the training split only; the test split is held out.",
            "",
            "Worst layer per init (the target is mean 0, std 1 at every layer):",
            "",
            table(summary_header, summary_rows, right=2),
            "",
            plot,
            "",
            *_findings(inits),
            "",
            "Every layer:",
            "",
            table(header, rows, right=2),
        ]
    )


def _findings(inits: dict) -> list[str]:
    test_std = {n: worst(s["test"], "std") for n, s in inits.items()}
    train_std = {n: worst(s["train"], "std") for n, s in inits.items()}
    mean_test = {n: worst(s["test"], "mean") for n, s in inits.items()}
    ranked = sorted(test_std, key=test_std.get)
    one_batch = [n for n in inits if n.startswith(("pypi-", "seed-"))]
    best_train = min(one_batch, key=train_std.get)
    best_test = min(one_batch, key=test_std.get)
    spread = {
        n: max(v["channel_std_max"] - v["channel_std_min"] for v in inits[n]["test"].values())
        for n in ("ours-tensor", "ours-channel")
    }
    return [
        "What it shows:",
        "",
        f"- On the training split, the one it is solved on, ours is at std 1 to within "
        f"{train_std['ours-tensor']:.1e} (tensor mode) and {train_std['ours-channel']:.1e} "
        f"(channel mode) at every layer; the closest one-batch init there, `{best_train}`, "
        f"is off by up to {train_std[best_train]:.1e}.",
        f"- On the held-out test split the worst layer is off by {test_std['ours-tensor']:.1e} "
        f"(ours, tensor), {test_std['ours-channel']:.1e} (ours, channel) and "
        f"{test_std[best_test]:.1e} (`{best_test}`, the closest one-batch init there); "
        f"PyTorch's default init by {test_std['default']:.2f}. Ranked by that number: "
        + ", ".join(f"`{n}`" for n in ranked)
        + ".",
        f"- Largest |mean| at any layer on the test split: {mean_test['ours-tensor']:.1e} "
        f"(ours, tensor), {mean_test['ours-channel']:.1e} (ours, channel), "
        + ", ".join(f"{mean_test[n]:.1e} (`{n}`)" for n in one_batch)
        + ". PyPI lsuv rescales weights only and leaves every bias at 0; the seed write-up "
        "and ours also shift the bias.",
        f"- Per-channel spread: the widest range of per-channel test std within one layer "
        f"is {spread['ours-channel']:.3f} in channel mode and {spread['ours-tensor']:.3f} in "
        "tensor mode.",
    ]


def _plot(plt, inits: dict):
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    for ax, split in zip(axes, SPLITS, strict=True):
        for name, s in inits.items():
            layers = list(s[split])
            style = "-" if name.startswith("ours") else "--"
            ax.plot(layers, [s[split][k]["std"] for k in layers], style, marker="o", label=name)
        ax.axhline(1.0, color="black", lw=0.8)
        ax.set_yscale("log")
        ax.set_title(f"output std per layer, MNIST {split}")
        ax.set_xlabel("layer (forward order)")
    axes[0].set_ylabel("std of layer output")
    axes[1].legend(fontsize=8, loc="lower left")
    return fig
