"""Executors: inline and dask give the same bytes; a lost worker or scheduler is survivable."""

import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
import zarr
from click.testing import CliRunner
from torch import nn

from lsuv_pipeline import RunConfig, compute
from lsuv_pipeline.cli import cli
from lsuv_pipeline.cluster import DaskExecutor
from lsuv_pipeline.progress import Progress
from tests.stores import assert_same_bytes

DRIVER = Path(__file__).with_name("crash_driver.py")

SMALL = ["--limit", "3000", "--shard-size", "500", "--batch-size", "250", "-q", "--device", "cpu"]
CONFIG = RunConfig(limit=3000, shard_size=500, batch_size=250)


def cli_compute(out, data_root, *extra, quiet=True):
    args = SMALL if quiet else [a for a in SMALL if a != "-q"]
    result = CliRunner().invoke(
        cli, ["compute", "--data-root", str(data_root), "--out", str(out), *args, *extra]
    )
    assert result.exit_code == 0, result.output + result.stderr
    return result


@pytest.fixture(scope="module")
def inline(tmp_path_factory, data_root):
    out = tmp_path_factory.mktemp("inline") / "run.zarr"
    cli_compute(out, data_root)
    return out


@pytest.mark.parametrize("workers", [1, 2])
def test_dask_workers_give_the_inline_bytes(tmp_path, data_root, inline, workers):
    out = tmp_path / "run.zarr"
    result = cli_compute(out, data_root, "--workers", str(workers), quiet=False)
    assert f"dask ({workers} workers); dashboard: http://127.0.0.1:" in result.stderr
    assert_same_bytes(out, inline)


@pytest.fixture
def cluster():
    from distributed import Client, LocalCluster

    with (
        LocalCluster(
            n_workers=2,
            threads_per_worker=1,
            processes=True,
            host="127.0.0.1",
            dashboard_address="127.0.0.1:0",
            silence_logs=50,
        ) as c,
        Client(c) as client,
    ):
        yield c, client


class KillAWorker(Progress):
    """Kills one worker process as soon as the first shard of the second pass is done."""

    def __init__(self, client):
        self.client = client
        self.passes = 0
        self.killed = None

    def pass_started(self, label, total):
        self.passes += 1

    def advance(self, n):
        if self.passes == 2 and self.killed is None:
            pids = self.client.run(os.getpid)
            self.killed = sorted(pids.values())[0]
            os.kill(self.killed, signal.SIGKILL)


def test_a_worker_killed_during_a_pass_costs_only_its_tasks(tmp_path, data_root, inline, cluster):
    _, client = cluster
    progress = KillAWorker(client)
    executor = DaskExecutor(client)
    compute(CONFIG, tmp_path / "run.zarr", data_root=data_root, device="cpu",
            executor=executor, progress=progress)  # fmt: skip
    assert progress.killed is not None
    assert progress.killed not in client.run(os.getpid).values()  # it really died
    assert_same_bytes(tmp_path / "run.zarr", inline)


def test_an_existing_scheduler_is_used_and_left_running(tmp_path, data_root, inline, cluster):
    local, client = cluster
    out = tmp_path / "run.zarr"
    cli_compute(out, data_root, "--scheduler", local.scheduler_address)
    assert_same_bytes(out, inline)
    assert client.status == "running"
    assert len(client.scheduler_info()["workers"]) == 2
    assert client.submit(sum, [1, 2]).result() == 3


def test_a_scheduler_file_works_too(tmp_path, data_root, inline, cluster):
    _, client = cluster
    path = tmp_path / "scheduler.json"
    client.write_scheduler_file(str(path))
    out = tmp_path / "run.zarr"
    cli_compute(out, data_root, "--scheduler-file", str(path))
    assert_same_bytes(out, inline)
    assert len(client.scheduler_info()["workers"]) == 2


@pytest.mark.parametrize(
    "args,message",
    [
        (["--scheduler", "tcp://127.0.0.1:9", "--scheduler-timeout", "2"],
         "cannot reach the dask scheduler at 'tcp://127.0.0.1:9'"),
        (["--scheduler", "no-port-here"], "cannot reach the dask scheduler at 'no-port-here'"),
        (["--scheduler-file", "/nonexistent/s.json"],
         "scheduler file '/nonexistent/s.json' does not exist"),
        (["--scheduler", "tcp://127.0.0.1:9", "--workers", "2"], "use only one of"),
    ],
)  # fmt: skip
def test_bad_scheduler_is_a_one_line_error(tmp_path, data_root, args, message):
    script = Path(sys.executable).with_name("lsuv-pipeline")
    proc = subprocess.run(
        [str(script), "compute", "--data-root", str(data_root), "--out", str(tmp_path / "r"),
         *SMALL, *args],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == (2 if "use only one of" in message else 1)  # 2: a usage mistake
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: ") and message in lines[0], proc.stderr


class Cluster:
    """A dask scheduler and two workers as separate processes, on ports the OS chose.

    The scheduler's address is read from its log as it starts (a blocking read, no
    polling); the rest of its log is drained by a thread into ``log``.
    """

    def __init__(self, log_dir: Path):
        bin_dir = Path(sys.executable).parent
        self.scheduler = subprocess.Popen(
            [str(bin_dir / "dask"), "scheduler", "--host", "127.0.0.1", "--port", "0",
             "--dashboard-address", "127.0.0.1:0"],
            stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True,
        )  # fmt: skip
        self.log: list[str] = []
        self.address = None
        for line in self.scheduler.stderr:
            self.log.append(line)
            if "Scheduler at:" in line:
                self.address = line.split("Scheduler at:")[1].strip()
                break
        assert self.address, "".join(self.log)
        self._drain = threading.Thread(target=self.log.extend, args=(self.scheduler.stderr,))
        self._drain.start()
        with open(log_dir / "worker.log", "ab") as wlog:
            self.workers = subprocess.Popen(
                [str(bin_dir / "dask"), "worker", self.address, "--nthreads", "1",
                 "--nworkers", "2", "--host", "127.0.0.1", "--no-dashboard"],
                stdout=wlog, stderr=subprocess.STDOUT,
            )  # fmt: skip

    def stop(self):
        for p in (self.scheduler, self.workers):
            if p.poll() is None:
                p.kill()
            p.wait(timeout=60)
        self._drain.join(timeout=60)
        self.scheduler.stderr.close()


#: Notes a run on a cluster prints on stderr besides its one error line (with -q).
NOTES = ("dask (", "solving ", "resuming ")


def lost_scheduler_run(tmp_path, data_root, out, point):
    """Run compute on a fresh cluster whose scheduler the run itself kills at ``point``."""
    cluster = Cluster(tmp_path)
    try:
        proc = subprocess.run(
            [sys.executable, str(DRIVER), point, "compute", "--data-root", str(data_root),
             "--out", str(out), *SMALL, "--scheduler", cluster.address,
             "--scheduler-timeout", "120"],
            capture_output=True, text=True, timeout=600,
            env={**os.environ, "CRASH_DRIVER_KILL_PID": str(cluster.scheduler.pid)},
        )  # fmt: skip
    finally:
        cluster.stop()
    return proc


@pytest.mark.parametrize(
    "point",
    ["pass:1", "shard:2", "commit:2", "shard:33"],
    ids=["before-the-first-submit", "mid-pass", "between-layers", "during-verification"],
)
def test_a_lost_scheduler_is_one_error_line_wherever_it_is_lost(tmp_path, data_root, point):
    out = tmp_path / "run.zarr"
    proc = lost_scheduler_run(tmp_path, data_root, out, point)
    assert proc.returncode == 1, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert "Traceback" not in proc.stderr + proc.stdout
    assert lines[-1].startswith("Error: ") and "lost the dask scheduler" in lines[-1], lines
    assert "rerun the same command to resume" in lines[-1]
    assert all(line.startswith(NOTES) for line in lines[:-1]), lines
    assert zarr.open_group(str(out), mode="r").attrs["status"] == "running"


def test_a_run_cut_by_a_lost_scheduler_resumes_to_the_same_bytes(tmp_path, data_root, inline):
    out = tmp_path / "run.zarr"
    assert lost_scheduler_run(tmp_path, data_root, out, "shard:14").returncode == 1
    proc = lost_scheduler_run(tmp_path, data_root, out, "none")
    assert proc.returncode == 0, proc.stderr
    assert "(resumed)" in proc.stderr
    assert_same_bytes(out, inline)


class _Attending(nn.Module):
    """A conv stem and one attention block: caller's model, caller's data, on workers."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(1, 8, 4, stride=4)
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        t = self.stem(x).flatten(2).transpose(1, 2)
        return self.head(self.attn(t, t, t, need_weights=False)[0].mean(1))


def test_a_callers_model_and_data_give_the_inline_weights_on_workers(tmp_path):
    x = torch.randn(192, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    cfg = RunConfig(dataset="noise", shard_size=64, batch_size=32)
    weights = []
    for name, workers in (("inline", None), ("dask", 1)):
        torch.manual_seed(0)
        result = compute(cfg, tmp_path / f"{name}.zarr", model=_Attending(), device="cpu",
                         data=torch.utils.data.TensorDataset(x), workers=workers)  # fmt: skip
        assert "attn.q_proj" in [s.name for s in result.solved]
        weights.append(result.model.state_dict())
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])


def test_an_image_folder_on_a_dask_worker_gives_the_inline_bytes(tmp_path):
    from tests.test_loading import jpeg_folder

    folder = jpeg_folder(tmp_path / "imgs")  # kept on the worker as uint8 pixels
    config = RunConfig(
        dataset=f"imagefolder:{folder}",
        dataset_options={"resize": 20, "crop": 16, "grayscale": True, "mean": [0.5], "std": [0.25]},
        model="tests.fixtures.user_models:small_cnn",
        holdout=None,
        shard_size=10,
        batch_size=4,
    )
    compute(config, tmp_path / "inline.zarr", device="cpu", loader_workers=2)
    compute(config, tmp_path / "dask.zarr", device="cpu", workers=1, cache=False)
    assert_same_bytes(tmp_path / "inline.zarr", tmp_path / "dask.zarr")


def test_a_local_cluster_that_cannot_start_is_one_error_line(tmp_path, monkeypatch):
    from lsuv_pipeline import cluster
    from lsuv_pipeline.errors import ExecutorError

    def fails(**options):
        raise RuntimeError("Nanny failed to start.")

    monkeypatch.setattr(cluster, "LocalCluster", fails)
    with pytest.raises(ExecutorError, match="could not start a local dask cluster of 2 worker"):
        compute(RunConfig(dataset="x", holdout=None), tmp_path / "r.zarr",
                model=torch.nn.Linear(2, 2), data=torch.randn(8, 2), workers=2)  # fmt: skip
