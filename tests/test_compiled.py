"""The compiled path (``--compile``): the same statistics to float32 rounding, bytes that
repeat within the mode, and a machine that cannot build it is one line."""

import numpy as np
import pytest
import torch
import zarr
from click.testing import CliRunner

from lsuv_pipeline import RunConfig, compiled, compute
from lsuv_pipeline import moments as mom
from lsuv_pipeline.cli import cli
from tests.stores import assert_same_bytes
from tests.test_cli import one_line_error
from tests.test_moments import close, two_pass

CONFIG = dict(limit=1200, shard_size=400, batch_size=100, holdout=None)


def test_compiled_rows_are_as_accurate_as_eager_ones():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(128, 8, 19, 19, generator=g) * 3 + 30  # 10 std off zero
    x[:, 2] = x[:, 2].relu()
    x[:, 5] = 7.25  # a constant channel: M2 exactly 0, as the solve's dead-channel test needs
    got = mom.from_batch(x, compiled=True)
    mean, var = two_pass(x.numpy())
    assert np.abs(got.mean.numpy() - mean).max() <= 1e-6 * np.sqrt(var).max()
    live = [c for c in range(8) if c != 5]
    assert close(got.var[live], var[live], 5e-7)
    assert got.m2[5].item() == 0.0 and got.mean[5].item() == 7.25
    eager = mom.from_batch(x)
    assert close(got.var, eager.var, 5e-7)


def test_compiled_rows_do_not_depend_on_the_thread_count():
    x = torch.randn(64, 16, 15, 15) * 2 + 1
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = mom.from_batch(x, compiled=True)
        torch.set_num_threads(2)
        two = mom.from_batch(x, compiled=True)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one.mean, two.mean) and torch.equal(one.m2, two.m2)


def test_a_compiled_run_repeats_its_bytes_and_is_a_run_of_its_own(tmp_path, data_root):
    a, b, eager = tmp_path / "a.zarr", tmp_path / "b.zarr", tmp_path / "eager.zarr"
    config = RunConfig(compile=True, **CONFIG)
    first = compute(config, a, data_root=data_root, device="cpu")
    compute(config, b, data_root=data_root, device="cpu", cache=False)
    assert_same_bytes(a, b)  # from the cut or from the input: the same kernel, same bytes
    assert first.compile_seconds >= 0.0 and first.layers
    assert compute(config, a, data_root=data_root, device="cpu").up_to_date
    assert zarr.open_group(a, mode="r").attrs["config"]["compile"] is True
    other = compute(RunConfig(**CONFIG), eager, data_root=data_root, device="cpu")
    assert "compile" not in zarr.open_group(eager, mode="r").attrs["config"]
    mine, theirs = first.model.state_dict(), other.model.state_dict()
    for key, value in mine.items():  # the same init to float32 rounding
        torch.testing.assert_close(value, theirs[key], rtol=1e-5, atol=1e-7)


def test_a_compiled_dask_worker_gives_the_inline_bytes(tmp_path, data_root):
    config = RunConfig(compile=True, **CONFIG)
    compute(config, tmp_path / "inline.zarr", data_root=data_root, device="cpu")
    compute(config, tmp_path / "dask.zarr", data_root=data_root, device="cpu", workers=1)
    assert_same_bytes(tmp_path / "inline.zarr", tmp_path / "dask.zarr")


def test_a_machine_that_cannot_compile_is_one_line_before_any_store(
    tmp_path, data_root, monkeypatch
):
    def broken(*args, **kwargs):
        raise RuntimeError("InvalidCxxCompiler: No working C++ compiler found")

    monkeypatch.setattr(compiled, "_ready", set())
    monkeypatch.setattr(compiled, "_kernel", broken)
    out = tmp_path / "r.zarr"
    argv = ["compute", "--data-root", str(data_root), "--out", str(out), "--compile",
            "--limit", "200", "--holdout", "none"]  # fmt: skip
    result = CliRunner().invoke(cli, argv)
    assert result.exit_code == 2, result.output  # the option cannot be honoured here
    one_line_error(result)
    assert "--compile" in result.output and "C++ compiler" in result.output
    assert not out.exists()


def test_compile_is_a_yes_or_no():
    with pytest.raises(Exception, match="compile must be true or false"):
        RunConfig(compile="yes")


#: A process whose inductor has no C++ compiler and no kernel built before (its own cache).
NO_COMPILER = {"CXX": "/nonexistent/g++"}


def test_a_dask_worker_that_cannot_compile_is_named_before_any_store(tmp_path, data_root):
    from distributed import Client, Nanny, Scheduler, SpecCluster

    env = {**NO_COMPILER, "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "inductor")}
    workers = {"w": {"cls": Nanny, "options": {"nthreads": 1, "host": "127.0.0.1", "env": env}}}
    scheduler = {"cls": Scheduler, "options": {"host": "127.0.0.1", "dashboard_address": ":0"}}
    with (
        SpecCluster(workers=workers, scheduler=scheduler, silence_logs=50) as cluster,
        Client(cluster) as client,
    ):
        client.wait_for_workers(1)
        (address,) = client.scheduler_info()["workers"]
        out = tmp_path / "r.zarr"
        argv = ["compute", "--data-root", str(data_root), "--out", str(out), "--compile",
                "--limit", "1000", "--shard-size", "500", "--holdout", "none", "-q",
                "--device", "cpu", "--scheduler", cluster.scheduler_address]  # fmt: skip
        result = CliRunner().invoke(cli, argv)
    assert result.exit_code == 2, result.output
    one_line_error(result)
    assert f"dask worker {address}: --compile" in result.output
    assert "C++ compiler" in result.output
    assert not out.exists()  # a rerun without --compile needs no --overwrite


class _Ranks:
    """This process as one of two ranks; the other rank's outcome of building the kernel
    is given."""

    world = 2

    def __init__(self, rank: int, other) -> None:
        self.rank, self.other = rank, other

    def gather(self, value):
        return [value, self.other] if self.rank == 0 else [self.other, value]


def test_a_rank_that_cannot_compile_stops_every_rank_with_its_name():
    from lsuv_pipeline.errors import ConfigError
    from lsuv_pipeline.ranks import RankExecutor

    failed = ("error", "--compile: torch.compile cannot build its kernel on this machine")
    for rank in (0, 1):  # each rank learns it, so no rank waits on the other in a pass
        with pytest.raises(ConfigError, match=rf"^rank {1 - rank}: --compile: torch\.compile"):
            RankExecutor(_Ranks(rank, failed), 500).compile(torch.float32)
    built = RankExecutor(_Ranks(0, ("built", 0.0)), 500)
    assert built.compile(torch.float32) >= 0.0
