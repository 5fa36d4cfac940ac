"""The benchmark's quick mode runs end to end and writes every table it promises.

The numbers themselves are timings on a noisy machine and are not asserted; the tables'
shape is: which methods, inits, layers, datasets and sizes appear, with a number in each
measured cell. One claim that does not depend on timing is checked too: ours puts every
layer at std 1 on the split it was solved on.
"""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
LIMIT = 1024
LAYERS = ["conv1", "conv2", "conv3", "conv4", "l1"]
COST_METHODS = [
    "forward",
    "forward-moments",
    "ours-tensor",
    "ours-nocache",
    "naive-full",
    "pypi-lsuv-256",
    "seed-lsuv-256",
]
INITS = [
    "default",
    "kaiming",
    "orthogonal",
    "pypi-lsuv-64",
    "pypi-lsuv-256",
    "pypi-lsuv-1024",
    "seed-lsuv-256",
    "ours-tensor",
    "ours-channel",
]
DATASETS = ["mnist", "fashion-mnist"]
SECTIONS = ["cost", "quality", "training", "scaling"]


@pytest.fixture(scope="module")
def results(data_root, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("bench")
    command = [
        sys.executable,
        str(REPO / "benchmarks" / "run.py"),
        "--quick",
        "--limit",
        str(LIMIT),
        "--data-root",
        str(data_root),
        "--out",
        str(out),
    ]
    proc = subprocess.run(command, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return out


def sections(text: str) -> dict[str, str]:
    """``## title`` -> the text under it."""
    parts = re.split(r"^## ", text, flags=re.M)[1:]
    return {p.split("\n", 1)[0].strip(): p.split("\n", 1)[1] for p in parts}


def tables(text: str) -> list[list[dict[str, str]]]:
    """Every markdown table in ``text`` as a list of rows keyed by the header."""
    found, lines = [], text.splitlines()
    i = 0
    while i < len(lines):
        if lines[i].startswith("|") and i + 1 < len(lines) and lines[i + 1].startswith("| ---"):
            header = [c.strip() for c in lines[i].strip("|").split(" | ")]
            rows, i = [], i + 2
            while i < len(lines) and lines[i].startswith("|"):
                cells = [c.strip() for c in lines[i].strip().strip("|").split(" | ")]
                rows.append(dict(zip(header, cells, strict=True)))
                i += 1
            found.append(rows)
        else:
            i += 1
    return found


def number(cell: str) -> float:
    value = float(cell.split(" ")[0].split("–")[0])
    assert math.isfinite(value), cell
    return value


def table_with(section: str, column: str) -> list[dict[str, str]]:
    matches = [t for t in tables(section) if t and column in t[0]]
    assert matches, f"no table with a {column!r} column"
    return matches[0]


@pytest.fixture(scope="module")
def report(results) -> dict[str, str]:
    return sections((results / "RESULTS.md").read_text())


def test_results_has_the_four_sections_and_raw_numbers(results, report):
    assert list(report) == ["1. Cost", "2. Init quality", "3. Training", "4. Scaling"]
    raw = json.loads((results / "results.json").read_text())
    assert {"machine", "settings", "cost", "quality", "training", "scaling"} <= set(raw)
    text = (results / "RESULTS.md").read_text()
    for image in re.findall(r"!\[[^\]]*\]\(([^)]+)\)", text):
        assert (results / image).is_file(), image


def test_cost_table_has_every_method_with_ratio_and_memory(report):
    rows = table_with(report["1. Cost"], "solve / forward (median)")
    assert [r["method"].strip("`") for r in rows] == COST_METHODS
    for r in rows:
        assert number(r["solve / forward (median)"]) > 0
        assert number(r["peak RSS MiB"]) > 0
        assert number(r["peak above baseline MiB"]) >= 0


def test_cost_compares_resnet18_with_and_without_the_cache(report):
    section = report["1. Cost"].split("### A deep network", 1)[1]
    rows = table_with(section, "passes")
    assert [r["method"].strip("`") for r in rows] == ["forward", "ours-tensor", "ours-nocache"]
    for r in rows:
        assert number(r["solve / forward (median)"]) > 0
    assert int(rows[1]["passes"]) == int(rows[2]["passes"]) >= 21  # 20 convs and fc
    # cache on and off must write the same store, and the report must say so
    assert "byte for byte" in section and "The stores differ" not in section


def test_quality_tables_have_every_init_and_layer_on_both_splits(report):
    section = report["2. Init quality"]
    worst = table_with(section, "max abs(std−1) test")
    assert [r["init"].strip("`") for r in worst] == INITS
    rows = table_with(section, "std test")
    assert [(r["init"].strip("`"), r["layer"]) for r in rows] == [
        (i, layer) for i in INITS for layer in LAYERS
    ]
    for r in rows:
        for column in ("mean train", "std train", "mean test", "std test"):
            number(r[column])
        if r["init"].startswith("`ours"):  # the exact solve, on the split it solved
            assert abs(number(r["std train"]) - 1) < 1e-4, r


def test_training_table_has_every_init_on_both_datasets(report):
    rows = table_with(report["3. Training"], "test acc % (mean)")
    assert [(r["dataset"], r["init"].strip("`")) for r in rows] == [
        (d, i) for d in DATASETS for i in INITS
    ]
    for r in rows:
        assert 0 <= number(r["test acc % (mean)"]) <= 100
        assert [k for k in r if k.startswith("train loss")], r
        for k in r:
            if k.startswith("train loss"):
                number(r[k])


def test_scaling_table_has_each_size_and_says_what_dask_did(report):
    section = report["4. Scaling"]
    rows = table_with(section, "samples")
    assert [(r["pass"], r["size"]) for r in rows] == [
        (how, size) for how in ("streaming", "cached") for size in ("1x", "2x", "4x")
    ]
    assert [int(r["samples"]) for r in rows] == [LIMIT, 2 * LIMIT, 4 * LIMIT] * 2
    for r in rows:
        assert number(r["solve s (median)"]) > 0
        assert number(r["peak above baseline MiB"]) >= 0
    dask = section.split("### Inline vs dask workers", 1)[1]
    rows = table_with(dask, "executor")
    assert rows[0]["executor"] == "inline" and "dask" in rows[1]["executor"]
    assert number(rows[1]["time / inline, in seconds (median)"]) > 0


def test_a_section_measured_again_keeps_the_others_with_when_they_were_measured(
    results, data_root, tmp_path
):
    from benchmarks.common import Settings
    from benchmarks.run import _previous

    old = json.loads((results / "results.json").read_text())
    assert set(old["measured"]) == set(SECTIONS)
    old["measured"]["training"] = "2026-01-01 00:00, commit abc1234"  # as if kept before
    (tmp_path / "results.json").write_text(json.dumps(old))
    settings = Settings.make(
        quick=True, limit=LIMIT, data_root=data_root, out=tmp_path, work=tmp_path
    )
    raw = _previous(settings, ("cost",), {"machine": {}, "seconds": {}})
    kept = [s for s in SECTIONS if s != "cost"]
    assert list(raw["measured"]) == kept
    assert raw["measured"]["training"] == "2026-01-01 00:00, commit abc1234"
    assert raw["machine"]["kept from an earlier run"] == "; ".join(
        f"{s}: {raw['measured'][s]}" for s in kept
    )
    assert "cost" not in raw and all(s in raw for s in kept)


def test_the_training_script_comparison_fills_its_table(data_root):
    from benchmarks import loop

    res = loop.measure(str(data_root), 256, 1)
    res.update(commit="test", cpu="test")
    (rows,) = tables(loop.render(res))
    assert [r["init"] for r in rows] == ["`lsuv_pipeline.lsuv_`", "`lsuv (PyPI)`"]
    columns = ["seconds (median)", "forward epochs", "max abs(std - 1)", "max abs(mean)"]
    assert all(math.isfinite(number(r[c])) for r in rows for c in columns)
    ours = rows[0]  # exact on the data it was solved on
    assert number(ours["max abs(std - 1)"]) < 1e-4 and number(ours["max abs(mean)"]) < 1e-4


def test_the_image_folder_comparison_writes_its_table(data_root, tmp_path):
    command = [sys.executable, str(REPO / "benchmarks" / "folder.py"), "--quick", "--write",
               "--data-root", str(data_root), "--out", str(tmp_path)]  # fmt: skip
    proc = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    text = (tmp_path / "folder.md").read_text()
    raw = json.loads((tmp_path / "folder.json").read_text())
    cases = list(raw["seconds"])
    assert [c.split(",")[0] for c in cases] == (
        ["read"] * 3 + ["epoch"] + ["solve"] * 3 + ["epoch", "solve"]
    )
    assert "solve, ours, 0 loader workers" in cases and "read, ours, 0 loader workers" in cases
    assert any("too small" in c for c in cases) and cases[-1].endswith("ViT")
    for case, runs in raw["seconds"].items():
        assert len(runs) == 1 and all(s > 0 for s in runs)
        assert re.search(rf"^\| {re.escape(case)} \| [0-9.]+ \| [0-9.]+ \|", text, re.M), case
    assert "| epoch, torchvision DataLoader" in text and "baseline epochs" in text
    assert "every pass runs from the input" in text and "The ViT's solve costs" in text


def test_the_device_benchmark_runs_its_cpu_fallback_and_fills_its_table(data_root):
    from benchmarks import gpu

    res = gpu.measure(data_root, 256, 1, models=("mj",))
    res["commit"] = "test"
    text = gpu.render(res)
    (rows,) = tables(text)
    assert [r["model"] for r in rows] == ["`mj`"]
    row = rows[0]
    assert number(row["solve / forward inline"]) > 0 and number(row["solve / forward dask"]) > 0
    assert row["inline = dask bytes"] == "yes"
    if res["device"] == "cpu":
        assert row["syncs / batch"] == "n/a (CPU)" and "CPU fallback" in text
    else:
        assert number(row["syncs / batch"]) >= 0


# -- deep thin networks and the sample-size study (their own scripts and reports) -----------

DEEP_INITS = ["default", "kaiming", "seed-lsuv-256", "ours-tensor", "ours-channel-1k"]
SAMPLE_MODELS = ["mj", "resnet18", "vit"]
SAMPLE_LABELS = ["random 100", "full", "sorted 100"]


def _script(name: str, data_root, out: Path) -> Path:
    command = [sys.executable, str(REPO / "benchmarks" / f"{name}.py"), "--quick", "--write",
               "--data-root", str(data_root), "--out", str(out)]  # fmt: skip
    proc = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return out


@pytest.fixture(scope="module")
def deep(data_root, tmp_path_factory) -> Path:
    return _script("deep", data_root, tmp_path_factory.mktemp("deep"))


@pytest.fixture(scope="module")
def samples(data_root, tmp_path_factory) -> Path:
    return _script("samples", data_root, tmp_path_factory.mktemp("samples"))


def _images_exist(folder: Path, markdown: str) -> None:
    images = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", markdown)
    assert images
    for image in images:
        assert (folder / image).is_file(), image


def test_deep_reports_every_init_with_accuracy_start_and_divergence(deep):
    text = (deep / "deep.md").read_text()
    _images_exist(deep, text)
    raw = json.loads((deep / "deep.json").read_text())
    lrs = raw["settings"]["lrs"]
    assert len(lrs) >= 2
    rows = table_with(text, "steps to below chance (median)")
    assert [(r["dataset"], r["init"].strip("`")) for r in rows] == [
        (d, i) for d in DATASETS for i in DEEP_INITS
    ]
    for r in rows:
        assert 0 <= number(r["test acc % (mean)"]) <= 100
        assert float(r["best lr"]) in lrs
        number(r["final train loss"])
        cell = r["steps to below chance (median)"]
        assert cell == "never" or 1 <= number(cell) <= raw["settings"]["steps"]
        for column in ("started", "diverged", "never started", "collapsed"):
            done, seeds = map(int, r[column].split("/"))
            assert 0 <= done <= seeds == len(raw["settings"]["seeds"])
    grid = table_with(text, f"lr {lrs[0]}: test acc %")
    assert len(grid) == len(rows)
    for r in grid:
        for lr in lrs:
            assert 0 <= number(r[f"lr {lr}: test acc %"]) <= 100
    assert "What it shows:" in text and text.count("- mnist, depth") == 1


def test_samples_reports_every_model_solve_and_layer_on_both_splits(samples):
    text = (samples / "samples.md").read_text()
    _images_exist(samples, text)
    raw = json.loads((samples / "samples.json").read_text())
    worst = table_with(text, "max abs(std−1) test")
    assert [(r["model"], r["solved on"]) for r in worst] == [
        (m, label) for m in SAMPLE_MODELS for label in SAMPLE_LABELS
    ]
    for r in worst:
        for column in ("max abs(std−1) train", "max abs(std−1) test"):
            assert number(r[column]) >= 0
        if r["solved on"] == "full":  # exact on the set it solved
            assert number(r["max abs(std−1) train"]) < 1e-4
    for model in SAMPLE_MODELS:
        layers = raw["models"][model]["layers"]
        assert layers
        for metric, split in (("abs(std−1)", "train"), ("abs(std−1)", "test"),
                              ("abs(mean)", "train"), ("abs(mean)", "test")):  # fmt: skip
            where = "set" if split == "train" else "split"
            section = text.split(f"{metric} over the {split} {where}, {model} (mean", 1)[1]
            rows = tables(section)[0]
            expected = (
                layers
                if metric == "abs(std−1)"
                else [k for k in layers if raw["models"][model]["bias"][k]]
            )
            assert [r["layer"] for r in rows] == expected
            for r in rows:
                for column in [*SAMPLE_LABELS, "split gap"]:
                    assert number(r[column]) >= 0
    assert text.count("- vit (") == 1 and "- resnet18 (" in text


def test_the_floor_report_judges_each_target_from_its_runs():
    from benchmarks import floor

    def run(ratio, digest="d"):
        return {"solve_s": 10.0 * ratio, "forward_s": 10.0, "compile_s": 0.0, "digest": digest}

    ratios = {"forward-moments": (1.34, 1.10), "forward-moments-compiled": (None, 1.20),
              "ours-tensor": (1.66, 1.25), "ours-compiled": (None, 1.35),
              "ours-default": (4.41, 3.60)}  # fmt: skip
    runs = {}
    for rev, alloc, method in floor.CASES:
        value = ratios[method][rev == "after"]
        runs[f"{rev}|{alloc}|{method}"] = [run(value + d) for d in (-0.01, 0.0, 0.02)]
    raw = {"runs": runs, "sizes": floor.FULL, "command": "floor", "before": "rev",
           "commit": "c", "load": "0", "date": "now"}  # fmt: skip
    default, tuned = tables(floor.render(raw))
    rows = {r["method"]: r for r in default}
    assert list(rows) == list(floor.TARGETS)
    assert rows["forward-moments"]["after / forward (range)"] == "1.10 (1.09–1.12)"
    assert rows["forward-moments"]["before / forward (range)"] == "1.34 (1.33–1.36)"
    met = {m: r["met"] for m, r in rows.items()}
    assert met == {"forward-moments": "yes", "forward-moments-compiled": "no",
                   "ours-tensor": "yes", "ours-compiled": "no", "ours-default": "no"}  # fmt: skip
    assert [r["method"] for r in tuned] == ["forward-moments", "ours-tensor"]
    assert "byte-identical stores for ours-tensor, ours-default" in floor.render(raw)


def test_the_floor_benchmark_extracts_another_revision_of_the_package(tmp_path):
    from benchmarks import floor

    package = floor.extract("HEAD", tmp_path)
    assert (package / "lsuv_pipeline" / "moments.py").is_file()


def test_the_floor_report_of_the_command_shows_where_the_first_touch_went():
    from benchmarks import floor

    def run(rev, ratio):
        faults, system = (700_000, 9.0) if rev == "before" else (2_000, 5.0)
        return {"solve_s": 10.0 * ratio, "forward_s": 10.0, "compile_s": 0.0, "digest": "d",
                "thread_faults": faults, "sys_s": system}  # fmt: skip

    ratios = {"forward-moments": 1.3, "ours-tensor": 2.4, "ours-default": 6.0}
    runs = {
        f"{rev}|{alloc}|{method}": [run(rev, ratios[method] - (rev == "after")) for _ in range(3)]
        for rev, alloc, method in floor.COMMAND_CASES
    }
    raw = {"runs": runs, "sizes": floor.FULL, "command": "floor", "before": "rev",
           "commit": "c", "load": "0", "date": "now", "cpu": "AMD EPYC"}  # fmt: skip
    text = floor.render(raw)
    (command,) = tables(text)
    rows = {r["method"]: r for r in command}
    assert list(rows) == ["forward-moments", "ours-tensor", "ours-default"]
    assert rows["ours-tensor"]["after / forward (range)"] == "1.40 (1.40–1.40)"
    assert rows["ours-tensor"]["met"] == "no" and rows["forward-moments"]["met"] == "yes"
    assert rows["ours-tensor"]["thread faults (before, after)"] == "700,000, 2,000"
    assert rows["ours-tensor"]["system s (before, after)"] == "9.0, 5.0"
    assert "command's own process" in text and "Machine: AMD EPYC" in text
    assert "byte-identical stores for ours-tensor, ours-default" in text
