"""The report page of a run (page.py, ``Run.report``): one self-contained, escaped file."""

from __future__ import annotations

import os
import re

import pytest
import torch.nn.functional as F
from torch import nn

from lsuv_pipeline import RunConfig, StoreError, compute, open_run
from lsuv_pipeline.page import PAGE_NAME, Page, render_page
from lsuv_pipeline.report import Table


class Twice(nn.Module):
    """A conv applied twice in a row: its calls feed each other, so it takes several passes."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(1, 8, 3, padding=1)
        self.shared = nn.Conv2d(8, 8, 3, padding=1)
        self.head = nn.Linear(8, 10)

    def forward(self, x):
        x = F.relu(self.stem(x))
        x = F.relu(self.shared(x))
        x = F.relu(self.shared(x))
        return self.head(x.mean((2, 3)))


@pytest.fixture(scope="module")
def twice(tmp_path_factory, data_root):
    out = tmp_path_factory.mktemp("twice") / "twice.zarr"
    cfg = RunConfig(limit=300, shard_size=300, batch_size=150)
    compute(cfg, out, model=Twice(), data_root=data_root, device="cpu")
    return open_run(out)


@pytest.fixture(scope="module")
def shipped_page(tmp_path_factory):
    folder = tmp_path_factory.mktemp("report") / "mj"
    path = open_run("mnist-mj").report(folder)
    return folder, path, path.read_text(encoding="utf-8")


def test_the_page_is_one_file_that_needs_nothing_else(shipped_page):
    folder, path, text = shipped_page
    assert path == folder / PAGE_NAME and [p.name for p in folder.iterdir()] == [PAGE_NAME]
    assert text.startswith("<!DOCTYPE html>") and text.rstrip().endswith("</html>")
    for outside in ("src=", "<link", "<script", "@import", "<iframe", "<object"):
        assert outside not in text, outside
    assert not re.search(r"""(href=["']|url\()(?!#)""", text)  # only references inside
    assert "<?xml" not in text and "<!DOCTYPE svg" not in text  # the SVGs are inlined


def test_the_page_shows_the_table_verdict_plot_and_provenance(shipped_page):
    text = shipped_page[2]
    for name in ("conv1", "conv2", "conv3", "conv4", "l1"):
        assert f"<td>{name}</td>" in text
    assert "verified on train at tol 0.0001: every solved layer on target" in text
    assert text.count("<svg") == 1 and "train 60000 samples, test 10000 samples" in text
    for fact in (
        "lsuv-pipeline 0.1.0",
        "mj, seed 0",
        "mnist / test, 10000 samples",
        "sha256:b703621e11b75b2b65be21b4047ee4e8decc2a0fea74ea1a969563ed399b02e3",
        "sha256:61bd5f9eff38b1bb",
    ):
        assert fact in text, fact


def test_a_run_solved_in_single_passes_says_so_in_one_line(shipped_page):
    text = shipped_page[2]
    section = text.split("<h2>Convergence</h2>", 1)[1].split("<h2>", 1)[0]
    assert "No layer needed more than one pass" in section and "<svg" not in section


def test_an_iterated_layer_has_its_convergence_curve(twice, tmp_path):
    text = twice.report(tmp_path / "r").read_text(encoding="utf-8")
    section = text.split("<h2>Convergence</h2>", 1)[1].split("<h2>", 1)[0]
    passes = twice.stats()[1].passes
    assert passes > 1 and len(twice.passes("shared")) == passes
    assert "shared: converged in" in section and section.count("<svg") == 1
    assert len(re.findall(r"<tr><td>shared</td><td class=\"num\">\d+</td>", section)) == passes
    assert "given by the caller" in text and "Twice on mnist" in text
    assert text.count("<svg") == 2
    ids = re.findall(r' id="([^"]+)"', text)
    assert len(ids) == len(set(ids))  # two inlined SVGs, no clashing ids


def test_every_text_is_escaped():
    evil = "<script>alert(1)</script>"
    table = Table(
        head=["layer", "kind", "note"],
        body=[[f"a{evil}", "x & y", ""]],
        flags=[["no bias"]],
        notes=[[f"no bias {evil}"]],
    )
    page = Page(
        title=f"net on {evil}",
        status="complete",
        verdict=evil,
        verdict_ok=None,
        table=table,
        facts=[(evil, [(evil, evil)])],
        footer=evil,
        convergence_note=evil,
    )
    text = render_page(page)
    assert "<script" not in text
    assert text.count("&lt;script&gt;") == 10
    assert "x &amp; y" in text


def test_the_page_honours_the_umask(tmp_path):
    run = open_run("mnist-mj")
    old = os.umask(0o077)
    try:
        first = run.report(tmp_path / "a")
    finally:
        os.umask(old)
    assert first.stat().st_mode & 0o777 == 0o600
    old = os.umask(0o022)
    try:
        again = run.report(tmp_path / "a")  # replaces the page, leaves no temporary file
    finally:
        os.umask(old)
    assert again.stat().st_mode & 0o777 == 0o644
    assert [p.name for p in (tmp_path / "a").iterdir()] == [PAGE_NAME]


def test_the_folder_is_made_only_inside_one_that_exists(tmp_path):
    run = open_run("mnist-mj")
    missing = tmp_path / "no"
    with pytest.raises(StoreError, match=f"parent folder '{re.escape(str(missing))}' does not"):
        run.report(missing / "report")
    assert not missing.exists()
    (tmp_path / "file").write_text("")
    with pytest.raises(StoreError, match="is a file, not a folder"):
        run.report(tmp_path / "file")
