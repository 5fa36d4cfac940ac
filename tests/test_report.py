"""The per-layer table's flags, the run title and the per-layer plot (report.py, figures.py)."""

from __future__ import annotations

import os
import re

import matplotlib
import pytest
import torch

from lsuv_pipeline import ConfigError, StoreError, open_run
from lsuv_pipeline import moments as mom
from lsuv_pipeline.figures import stats_figure
from lsuv_pipeline.report import (
    LayerStats,
    format_table,
    plot_stats,
    run_title,
    table_rows,
    write_atomic,
)

COUNT = 1000


def moments(mean: float, std: float, channels: int = 4) -> mom.Moments:
    """Moments of ``channels`` channels that all have this mean and std (pooled: the same)."""
    m = torch.full((channels,), mean, dtype=torch.float64)
    return mom.Moments(COUNT, m, torch.full((channels,), std**2 * COUNT, dtype=torch.float64))


@pytest.fixture
def rows() -> list[LayerStats]:
    """One layer of each kind the table flags, and one on target (its std exactly 1)."""
    before = moments(0.1, 0.3)
    return [
        LayerStats(
            name="conv1",
            kind="Conv2d",
            passes=1,
            converged=True,
            before=before,
            after={"train": moments(0.0, 1.0), "test": moments(2e-3, 0.99)},
        ),
        LayerStats(
            name="nobias",
            kind="Conv2d",
            passes=1,
            converged=True,
            has_bias=False,
            before=before,
            after={"train": moments(0.05, 1.0), "test": moments(0.04, 1.0)},
        ),
        LayerStats(
            name="skipped",
            kind="Conv2d",
            passes=0,
            converged=False,
            solved=False,
            reason="left out by --include / --exclude",
        ),
        LayerStats(
            name="loop",
            kind="Conv2d",
            passes=20,
            converged=False,
            before=before,
            after={"train": moments(1e-3, 0.9), "test": moments(1e-3, 0.9)},
        ),
        LayerStats(
            name="fc",
            kind="Linear",
            passes=1,
            converged=True,
            before=before,
            after={"train": moments(1e-8, 1.0 + 1e-8), "test": moments(3e-3, 1.01)},
        ),
    ]


def figure(rows, **kw):
    table = table_rows(
        rows, splits=["train", "test"], solve_split="train", target_std=1.0, tol=1e-4
    )
    return stats_figure(
        rows,
        splits=["train", "test"],
        flags=table.flags,
        tol=1e-4,
        solve_split="train",
        title="t",
        **kw,
    )


def legend_texts(fig) -> list[str]:
    return [t.get_text() for ax in fig.axes if ax.get_legend() for t in ax.get_legend().texts]


def test_table_notes_and_flags_agree(rows):
    table = table_rows(
        rows, splits=["train", "test"], solve_split="train", target_std=1.0, tol=1e-4
    )
    assert table.flags == [[], ["no bias"], ["not solved"], ["not converged", "off target"], []]
    assert table.body[3][-1] == "NOT CONVERGED; train OFF TARGET by > 0.0001"
    text = format_table(
        rows, splits=["train", "test"], solve_split="train", target_std=1.0, tol=1e-4
    )
    assert "not solved: left out by --include / --exclude" in text
    assert "no bias: mean not solved" in text
    assert text.splitlines()[0].split() == [
        "layer",
        "kind",
        "mean",
        "before",
        "std",
        "before",
        "mean",
        "train",
        "std",
        "train",
        "mean",
        "test",
        "std",
        "test",
        "passes",
        "note",
    ]


@pytest.mark.parametrize(
    ("ext", "magic"), [(".png", b"\x89PNG\r\n\x1a\n"), (".pdf", b"%PDF-"), (".svg", b"<?xml")]
)
def test_the_extension_picks_the_format(tmp_path, rows, ext, magic):
    path = plot_stats(rows, tmp_path / f"stats{ext}", splits=["train", "test"], tol=1e-4)
    data = path.read_bytes()
    assert data.startswith(magic) and len(data) > 5_000
    if ext == ".svg":
        assert b"<svg" in data and b"layer, in forward order" in data
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"stats{ext}"]  # no temp file left


def test_png_is_drawn_at_150_dpi(tmp_path, rows):
    data = plot_stats(rows, tmp_path / "s.png", splits=["train"]).read_bytes()
    i = data.index(b"pHYs")  # pixels per metre
    assert int.from_bytes(data[i + 4 : i + 8], "big") == round(150 / 0.0254)


def test_an_unknown_extension_is_a_config_error_naming_the_path(tmp_path, rows):
    with pytest.raises(ConfigError, match=r"stats\.jpg.*\.png, \.svg, \.pdf"):
        plot_stats(rows, tmp_path / "stats.jpg", splits=["train"])
    with pytest.raises(ConfigError, match="stats': unknown file type"):
        plot_stats(rows, tmp_path / "stats", splits=["train"])
    assert not list(tmp_path.iterdir())


def test_a_missing_folder_is_named_not_created(tmp_path, rows):
    missing = tmp_path / "no" / "such"
    with pytest.raises(StoreError, match=f"the folder '{re.escape(str(missing))}' does not exist"):
        plot_stats(rows, missing / "stats.png", splits=["train"])
    assert not (tmp_path / "no").exists()
    (tmp_path / "file").write_text("")
    with pytest.raises(StoreError, match="is a file"):
        plot_stats(rows, tmp_path / "file" / "stats.png", splits=["train"])


def test_every_series_has_its_own_marker_and_colour(rows):
    fig = figure(rows)
    for ax in (fig.axes[0], fig.axes[2]):  # std panel, residual panel
        lines = [ln for ln in ax.get_lines() if not ln.get_label().startswith("_")]
        series = [ln for ln in lines if ln.get_marker() not in ("None", "", None)]
        looks = {(ln.get_marker(), ln.get_color(), str(ln.get_markerfacecolor())) for ln in series}
        assert len(series) >= 3 and len(looks) == len(series)
    std_labels = [ln.get_label() for ln in fig.axes[0].get_lines()]
    assert std_labels[:3] == [
        "before LSUV (initial weights), train",
        "after LSUV, train",
        "after LSUV, test",
    ]
    # the split solved on is filled, the held-out one hollow: neither hides the other
    train, test = fig.axes[0].get_lines()[1:3]
    assert train.get_markerfacecolor() != "none" and test.get_markerfacecolor() == "none"
    assert train.get_zorder() < test.get_zorder()


def test_flagged_layers_are_named_in_the_legend_and_coloured(rows):
    fig = figure(rows)
    texts = legend_texts(fig)
    for expected in (
        "flagged: no bias: mean not solved",
        "flagged: NOT CONVERGED",
        "flagged: train OFF TARGET by > 0.0001",
        "flagged: not solved (left as it is)",
        "no bias: mean not solved",
        "|mean|, train, no bias (not judged)",
    ):
        assert expected in texts
    ticks = {t.get_text(): t.get_color() for t in fig.axes[2].get_xticklabels()}
    assert ticks["conv1"] == ticks["fc"] == "black"
    assert len({ticks["nobias"], ticks["skipped"], ticks["loop"]} - {"black"}) == 3
    assert fig.axes[2].get_xlabel() == "layer, in forward order"


def test_a_bias_free_mean_is_not_on_the_judged_mean_series(rows):
    fig = figure(rows)
    res = {ln.get_label(): ln for ln in fig.axes[2].get_lines()}
    judged = res["|mean|, train"].get_ydata()
    assert judged[1] != judged[1]  # NaN: the bias-free layer's mean is drawn apart
    assert res["|mean|, train, no bias (not judged)"].get_ydata()[1] == pytest.approx(0.05)


def test_exact_zeros_are_drawn_on_a_marked_floor(rows):
    fig = figure(rows)
    floor = [t for t in legend_texts(fig) if t.startswith("exactly 0 (drawn at ")]
    assert len(floor) == 1
    level = float(floor[0].removeprefix("exactly 0 (drawn at ").rstrip(")"))
    std = {ln.get_label(): ln for ln in fig.axes[2].get_lines()}["|std - target|, train"]
    assert std.get_ydata()[0] == level > 0  # conv1 is exactly on target


def test_rows_without_measurements_draw_without_warnings(tmp_path):
    rows = [
        LayerStats(name="a", kind="Conv2d", passes=0, converged=False, solved=False),
        LayerStats(name="b", kind="Linear", passes=0, converged=False, solved=False),
    ]
    assert plot_stats(rows, tmp_path / "empty.svg", splits=["train"]).stat().st_size > 0


def test_the_title_has_the_recorded_sample_counts():
    attrs = open_run("mnist-mj").attrs
    assert run_title(attrs) == "mj on mnist (tensor mode): train 60000 samples, test 10000 samples"
    attrs = {
        "config": {"model": "mj", "mode": "channel", "limit": 5000, "holdout": "test"},
        "dataset": {"name": "mnist", "split": "train", "count": 5000},
        "model": {"class": "pkg.Net", "source": "caller"},
    }
    assert (
        run_title(attrs)
        == "Net on mnist (channel mode): train 5000 samples (limit 5000), test split"
    )


def test_run_plot_titles_and_flags_the_shipped_checkpoint(tmp_path):
    backend = matplotlib.get_backend()
    svg = open_run("mnist-mj").plot(tmp_path / "mj.svg").read_text()
    assert "train 60000 samples, test 10000 samples" in svg
    assert "tol 0.0001 (judged on train)" in svg and "flagged" not in svg
    assert matplotlib.get_backend() == backend  # drawn without pyplot or a backend switch


def test_write_atomic_honours_the_umask(tmp_path):
    old = os.umask(0o027)
    try:
        path = write_atomic(tmp_path / "f.bin", b"x", "a file")
    finally:
        os.umask(old)
    assert path.read_bytes() == b"x" and path.stat().st_mode & 0o777 == 0o640
    assert [p.name for p in tmp_path.iterdir()] == ["f.bin"]
