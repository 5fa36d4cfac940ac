"""How many samples each layer needed: the running estimate after every shard, in shard order."""

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from click.testing import CliRunner

from lsuv_pipeline import RunConfig, compute, open_run
from lsuv_pipeline import moments as mom
from lsuv_pipeline.cli import cli
from lsuv_pipeline.errors import StoreError
from lsuv_pipeline.progress import Progress
from lsuv_pipeline.running import EPSILONS, Running, record, samples_within
from lsuv_pipeline.zarrio import consolidate
from tests.stores import assert_same_bytes

# 1500 samples in shards of 256: 6 shards, the last of 220
SMALL = dict(limit=1500, shard_size=256, batch_size=128, holdout=None)
SIZES = [256] * 5 + [220]
LAYERS = ["conv1", "conv2", "conv3", "conv4", "l1"]
SHIPPED = Path(__file__).resolve().parents[1] / "data" / "mnist-mj.zarr"


def run_small(out, data_root, **kw):
    return compute(RunConfig(**{**SMALL, **kw}), out, data_root=data_root, device="cpu")


@pytest.fixture(scope="module")
def reference(tmp_path_factory, data_root):
    out = tmp_path_factory.mktemp("ref") / "run.zarr"
    run_small(out, data_root)
    return out


def by_hand(curve: Running, eps: float):
    """The fewest samples from which every row, the full split's excepted, is within eps."""
    columns = (curve.samples.tolist(), curve.mean_dev.tolist(), curve.std_dev.tolist())
    rows = list(zip(*columns, strict=True))
    for i, (n, _, _) in enumerate(rows[:-1]):
        if all(dm <= eps and ds <= eps for _, dm, ds in rows[i:]):
            return n
    return None


def test_every_solved_layer_records_one_row_per_shard_ending_at_the_full_split(reference):
    run = open_run(reference)
    curves = run.running()
    assert list(curves) == LAYERS
    for name, curve in curves.items():
        assert curve is not None, name
        assert curve.samples.tolist() == np.cumsum(SIZES).tolist()  # monotone, ends at 1500
        full = mom.reduce_channels(run.layer(name)["before"])
        assert curve.mean[-1].item() == full.mean.item()  # the same fold: the same bits
        assert curve.std[-1].item() == full.std.item()
        assert curve.mean_dev[-1].item() == 0 and curve.std_dev[-1].item() == 0
        dev = (curve.mean[:-1] - full.mean).abs() / full.std
        assert torch.allclose(curve.mean_dev[:-1], dev, rtol=1e-12, atol=0)
        assert (curve.mean_dev[:-1] > 0).all()  # 1500 MNIST samples are not enough for 1e-16


def test_samples_within_is_the_first_count_from_which_every_later_row_stays_within(reference):
    needed = open_run(reference).samples_needed()
    curves = open_run(reference).running()
    assert list(needed) == LAYERS
    for name, counts in needed.items():
        assert list(counts) == list(EPSILONS)
        for eps, n in counts.items():
            assert n == by_hand(curves[name], eps), (name, eps)
            assert n is None or 256 <= n < 1500
        loose, tight = counts[1e-3], counts[1e-4]
        assert tight is None or (loose is not None and loose <= tight)


def test_record_matches_a_float64_two_pass_reference_in_both_modes():
    gen = torch.Generator().manual_seed(1)
    # 5 shards of 2 calls, 3 channels with their own scales and offsets, one channel constant
    data = [torch.randn(2, n, 3, generator=gen, dtype=torch.float64) for n in (40, 7, 90, 1, 33)]
    data = [x * torch.tensor([1.0, 1e-3, 0.0]) + torch.tensor([1e4, -2.0, 5.0]) for x in data]
    shards = [tuple(mom.from_batch(x[c], channel_dim=-1) for c in range(2)) for x in data]
    for mode in ("tensor", "channel"):
        curve = record(shards, [x.shape[1] for x in data], mode=mode)
        assert curve.samples.tolist() == [40, 47, 137, 138, 171]
        full = torch.cat(data, dim=1).reshape(-1, 3).numpy()
        for i in range(len(data)):
            seen = torch.cat(data[: i + 1], dim=1).reshape(-1, 3).numpy()
            assert curve.mean[i].item() == pytest.approx(seen.mean(), rel=1e-12)
            assert curve.std[i].item() == pytest.approx(seen.std(), rel=1e-9)
            if mode == "tensor":
                dm = abs(seen.mean() - full.mean()) / full.std()
                ds = abs(seen.std() - full.std()) / full.std()
            else:  # the worst live channel; the constant one deviates by exactly 0
                live = full.std(axis=0) > 0
                dm = (abs(seen.mean(0) - full.mean(0))[live] / full.std(0)[live]).max()
                ds = (abs(seen.std(0) - full.std(0))[live] / full.std(0)[live]).max()
            assert curve.mean_dev[i].item() == pytest.approx(dm, rel=1e-6, abs=1e-12)
            assert curve.std_dev[i].item() == pytest.approx(ds, rel=1e-6, abs=1e-12)


def test_samples_within_counts_only_prefixes_short_of_the_split():
    def curve(dev):
        n = len(dev)
        dev = torch.tensor(dev, dtype=torch.float64)
        return Running(torch.arange(1, n + 1) * 10, torch.zeros(n), torch.ones(n), dev, dev * 0)

    assert samples_within(curve([5e-3, 5e-4, 2e-3, 5e-4, 1e-4, 0.0]), 1e-3) == 40
    assert samples_within(curve([5e-4, 5e-4, 0.0]), 1e-3) == 10
    assert samples_within(curve([5e-4, 5e-3, 0.0]), 1e-3) is None  # only the whole split
    assert samples_within(curve([float("nan"), 0.0]), 1e-3) is None
    assert samples_within(curve([0.0]), 1e-3) is None  # one shard: nothing to say


class CrashIn(Progress):
    """Raises in the pass whose label contains ``label``, after ``batches`` batches."""

    def __init__(self, label, batches):
        self.label, self.batches, self.current = label, batches, ""

    def pass_started(self, label, total):
        self.current = label

    def advance(self, n):
        if self.label in self.current:
            self.batches -= 1
            if self.batches < 0:
                raise RuntimeError("the machine went away")


@pytest.mark.parametrize("label", ["conv1", "conv3"])
def test_a_resumed_run_records_the_same_rows_as_an_uninterrupted_one(
    tmp_path, data_root, reference, label
):
    out = tmp_path / "run.zarr"
    config = RunConfig(**SMALL)
    with pytest.raises(RuntimeError, match="went away"):
        compute(config, out, data_root=data_root, device="cpu", progress=CrashIn(label, 5))
    assert not open_run(out).layer_attrs(label)  # stopped inside its pass
    done = zarr.open_group(str(out), mode="r")["partial/done"][...]
    assert done.tolist() == [1, 1, 0, 0, 0, 0]  # its first two shards are read back, not rerun
    compute(config, out, data_root=data_root, device="cpu")
    assert_same_bytes(out, reference)  # the running arrays included


def test_show_convergence_draws_the_plot_and_prints_the_samples_needed(tmp_path, reference):
    png = tmp_path / "conv.png"
    result = CliRunner().invoke(cli, ["show", str(reference), "--convergence", str(png)])
    assert result.exit_code == 0, result.output
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    lines = result.stdout.splitlines()
    head = next(i for i, line in enumerate(lines) if line.startswith("layer"))
    assert lines[head].split() == ["layer", "samples", "within", "0.001", "within", "0.0001"]
    needed = open_run(reference).samples_needed()
    for name, line in zip(LAYERS, lines[head + 2 : head + 7], strict=True):
        want = [str(n) if n is not None else "not within" for n in needed[name].values()]
        assert line.split(None, 2) == [name, "1500", line.split(None, 2)[2]]
        assert " ".join(line.split()[2:]) == " ".join(want)


def _without_running(shipped: Path, out: Path) -> Path:
    """A copy of a finished store as one written before running estimates were recorded."""
    shutil.copytree(shipped, out)
    for group in out.glob("layers/*/running"):
        shutil.rmtree(group)
    consolidate(out)
    return out


def test_the_shipped_checkpoint_says_how_many_samples_each_layer_needed():
    needed = open_run("mnist-mj").samples_needed()
    assert list(needed) == LAYERS
    for counts in needed.values():
        assert all(n is None or 0 < n <= 60000 for n in counts.values())


def test_a_store_without_running_estimates_is_one_error_line(tmp_path):
    old = _without_running(SHIPPED, tmp_path / "old.zarr")
    with pytest.raises(StoreError, match="has no running estimates"):
        open_run(old).samples_needed()
    png = tmp_path / "conv.png"
    result = CliRunner().invoke(cli, ["show", str(old), "--convergence", str(png)])
    assert result.exit_code == 1
    assert result.stderr.strip().count("\n") == 0 and "Traceback" not in result.output
    assert result.stderr.startswith("Error: ") and "no running estimates" in result.stderr
    assert "--overwrite" in result.stderr
    assert not png.exists()  # refused before anything is written
