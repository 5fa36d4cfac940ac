"""torch.distributed: two gloo ranks under torchrun give the bytes of one process."""

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

DRIVER = Path(__file__).with_name("rank_driver.py")


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ranks(out: Path, *options: str, ok: bool = True) -> list[dict]:
    """Run the driver as a two-rank torchrun job; each rank's record."""
    out.mkdir(exist_ok=True)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
           "--master-addr", "127.0.0.1", "--master-port", str(_port()),
           str(DRIVER), str(out), *options]  # fmt: skip
    env = {**os.environ, "TMPDIR": str(out.parent)}  # a killed rank's temporary copy
    done = subprocess.run(cmd, cwd=out, capture_output=True, text=True, timeout=600, env=env)
    if not ok:
        assert done.returncode != 0
        return []
    assert done.returncode == 0, done.stderr[-3000:]
    return [torch.load(out / f"rank{r}.pt") for r in (0, 1)]


def alone(out: Path, *options: str) -> dict:
    out.mkdir(exist_ok=True)
    cmd = [sys.executable, str(DRIVER), str(out), "--alone", *options]
    done = subprocess.run(cmd, cwd=out, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return torch.load(out / "alone.pt")


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> dict:
    return alone(tmp_path_factory.mktemp("alone"))["state"]


def test_two_ranks_give_the_bytes_of_one_process_and_write_nothing(tmp_path, reference):
    got = ranks(tmp_path / "job")
    assert "error" not in got[0] and "error" not in got[1]
    assert same(got[0]["state"], reference)
    assert same(got[1]["state"], reference)
    assert sorted(p.name for p in (tmp_path / "job").iterdir()) == ["rank0.pt", "rank1.pt"]


def test_one_ranks_shards_alone_give_far_other_weights(tmp_path, reference):
    """What the test data makes of a missing exchange: rank 0's half (scale 1) alone
    gives a first layer scaled about 50 times as much as the whole (half at scale 100)."""
    half = alone(tmp_path / "half", "--first-half")["state"]
    ratio = (half["0.weight"] / reference["0.weight"]).median().item()
    assert ratio > 20


def test_compute_on_two_ranks_writes_one_store_then_is_up_to_date(tmp_path, reference):
    job = tmp_path / "job"
    first = ranks(job, "--api", "compute")
    assert [r.get("error") for r in first] == [None, None]
    assert same(first[0]["state"], reference) and same(first[1]["state"], reference)
    assert first[0]["passes"] == first[1]["passes"] == 3
    assert first[1]["path"] == str(job / "run.zarr")
    assert sorted(p.name for p in job.iterdir()) == ["rank0.pt", "rank1.pt", "run.zarr"]
    again = ranks(job, "--api", "compute")
    assert [r["up_to_date"] for r in again] == [True, True]
    assert [r["passes"] for r in again] == [0, 0]
    assert same(again[1]["state"], reference)


def test_ranks_with_other_initial_weights_all_start_from_rank_0s(tmp_path, reference):
    got = ranks(tmp_path / "job", "--other-seed")
    assert same(got[0]["state"], reference) and same(got[1]["state"], reference)


def test_a_rank_with_other_data_is_an_error_on_every_rank(tmp_path):
    got = ranks(tmp_path / "job", "--other-data")
    for r in got:
        assert r["error"].startswith("ConfigError: rank 1 of 2 runs another")
        assert "dataset fingerprint" in r["error"]


def test_a_job_killed_after_two_layers_resumes_on_two_ranks_to_the_same_bytes(tmp_path, reference):
    job = tmp_path / "job"
    ranks(job, "--api", "compute", "--die-after-commits", "2", ok=False)
    resumed = ranks(job, "--api", "compute")
    assert [r.get("error") for r in resumed] == [None, None]
    assert [r["passes"] for r in resumed] == [1, 1]  # the third layer only
    assert same(resumed[0]["state"], reference) and same(resumed[1]["state"], reference)


class OneOfTwo:
    """Rank 0 of two, in this process: the other rank's part of every exchange is given."""

    rank, world, main = 0, 2, True

    def __init__(self, theirs):
        self.theirs = theirs

    def gather(self, value):
        return [value, self.theirs]


def _pass(theirs):
    """One pass of a two-layer model over 64 samples in four shards, on rank 0 of two."""
    from torch.utils.data import TensorDataset

    from lsuv_pipeline.data import source_from
    from lsuv_pipeline.layers import plan_layers, trace
    from lsuv_pipeline.ranks import RankExecutor
    from lsuv_pipeline.shard import PassPlan

    model = torch.nn.Sequential(torch.nn.Linear(4, 3))
    source = source_from(TensorDataset(torch.randn(64, 4)), name="x", split="train")
    plan = plan_layers(model, trace(model, torch.randn(2, 4)))
    ex = RankExecutor(OneOfTwo(theirs), 16)
    return list(ex.run_pass(model, source, source.shards(16), PassPlan(tuple(plan.layers), None, 8),
                            device=torch.device("cpu")))  # fmt: skip


@pytest.mark.parametrize(
    ("failure", "error", "text"),
    [
        (("DataError", "samples 32..47 are NaN"), "DataError", "rank 1: samples 32..47"),
        (("Interrupted", "layer 0"), "Interrupted", "layer 0"),
        (("RuntimeError", "shape mismatch"), "ExecutorError", "rank 1: shape mismatch"),
    ],
)
def test_a_rank_whose_shards_fail_stops_every_rank_with_its_error(failure, error, text):
    from lsuv_pipeline import errors

    with pytest.raises(getattr(errors, error), match=text):
        _pass(([], failure))


def test_rank_0_computes_the_first_block_and_takes_the_others_from_the_exchange():
    theirs = [(2, {"0": ("a",)}), (3, {"0": ("b",)})]
    got = _pass((theirs, None))
    assert [s.index for s, _ in got] == [0, 1, 2, 3]
    assert got[2][1] == {"0": ("a",)} and got[3][1] == {"0": ("b",)}
    assert got[0][1]["0"][0].count == 16  # computed here


def test_the_cli_under_torchrun_writes_the_store_of_one_process(tmp_path, data_root):
    from lsuv_pipeline import open_run

    args = ["compute", "--dataset", "mnist", "--limit", "4096", "--shard-size", "1024",
            "--holdout", "none", "--device", "cpu", "-q"]  # fmt: skip
    root = str(Path(data_root).resolve())  # the runs' working folder is tmp_path
    env = {**os.environ, "OMP_NUM_THREADS": "1", "LSUV_DATA_ROOT": root}
    one = subprocess.run([sys.executable, "-m", "lsuv_pipeline", *args, "--out", "one.zarr"],
                         cwd=tmp_path, env=env, capture_output=True, text=True)  # fmt: skip
    assert one.returncode == 0, one.stderr[-2000:]
    two = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
         "--master-addr", "127.0.0.1", "--master-port", str(_port()),
         "-m", "lsuv_pipeline", *args, "--out", "two.zarr"],
        cwd=tmp_path, env=env, capture_output=True, text=True,
    )  # fmt: skip
    assert two.returncode == 0, two.stderr[-2000:]
    assert two.stdout.count("conv1") == 1  # rank 0 alone reports
    a, b = (
        open_run(tmp_path / "one.zarr").state("final"),
        open_run(tmp_path / "two.zarr").state("final"),
    )
    assert same(a, b)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["one.zarr", "two.zarr"]


def test_distributed_true_without_a_group_is_one_line():
    from lsuv_pipeline import RunConfig, compute
    from lsuv_pipeline.errors import ConfigError

    with pytest.raises(ConfigError, match=r"no torch\.distributed process group"):
        compute(RunConfig(dataset="x", holdout=None), "unused.zarr",
                model=torch.nn.Linear(2, 2), data=torch.randn(8, 2), distributed=True)  # fmt: skip


def test_dask_options_inside_a_group_of_ranks_are_refused_before_any_exchange(monkeypatch):
    from lsuv_pipeline import RunConfig, compute, run
    from lsuv_pipeline.errors import ConfigError
    from lsuv_pipeline.ranks import Ranks

    monkeypatch.setattr(run, "current", lambda distributed: Ranks(0, 2))
    with pytest.raises(ConfigError, match="group of 2 ranks: the ranks already split"):
        compute(RunConfig(dataset="x", holdout=None), "unused.zarr",
                model=torch.nn.Linear(2, 2), data=torch.randn(8, 2), workers=2)  # fmt: skip
