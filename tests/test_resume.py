"""Crash safety: a run killed anywhere resumes to the same bytes; one writer at a time."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import zarr
from click.testing import CliRunner

from lsuv_pipeline import RunConfig, compute
from lsuv_pipeline.cli import cli
from lsuv_pipeline.errors import StoreError
from lsuv_pipeline.lock import LOCK_NAME, writer_lock
from tests.stores import assert_same_bytes, store_files

DRIVER = Path(__file__).with_name("crash_driver.py")
# 2400 train and 2400 test samples in 6 shards of 400: 6 shards per pass
ARGS = ["--limit", "2400", "--shard-size", "400", "--batch-size", "200", "-q", "--device", "cpu"]


def drive(point, out, data_root, *extra):
    return subprocess.run(
        [sys.executable, str(DRIVER), point, "compute", "--data-root", str(data_root),
         "--out", str(out), *ARGS, *extra],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip


@pytest.fixture(scope="module")
def reference(tmp_path_factory, data_root):
    """Uninterrupted runs, through the same driver."""
    refs = {}
    for model in ("mj", "twice"):
        out = tmp_path_factory.mktemp("ref") / f"{model}.zarr"
        proc = drive("none", out, data_root, "--model", model)
        assert proc.returncode == 0, proc.stderr
        refs[model] = out
    return refs


@pytest.mark.parametrize(
    "model,kills",
    [
        ("mj", ["shard:3"]),  # during the first layer's pass
        ("mj", ["torn:9"]),  # mid-write of a shard record, second layer's pass
        ("mj", ["commit:2"]),  # between layers
        ("mj", ["shard:40", "shard:3"]),  # during verification, then again on resume
        ("mj", ["final:3"]),  # during the final write
        ("mj", ["status:1"]),  # everything written but the completion mark
        ("twice", ["shard:16"]),  # during the refinement passes of the shared conv
    ],
    ids=["first-pass", "torn-shard", "between-layers", "verify-twice", "final-write",
         "before-complete", "refinement"],
)  # fmt: skip
def test_sigkill_anywhere_then_resume_gives_the_same_bytes(
    tmp_path, data_root, reference, model, kills
):
    out = tmp_path / "run.zarr"
    for point in kills:
        proc = drive(point, out, data_root, "--model", model)
        assert proc.returncode == -signal.SIGKILL, (point, proc.returncode, proc.stderr)
        assert zarr.open_group(str(out), mode="r").attrs["status"] == "running"
    proc = drive("none", out, data_root, "--model", model)
    assert proc.returncode == 0, proc.stderr
    assert "(resumed)" in proc.stderr
    assert_same_bytes(out, reference[model])
    assert store_files(out) == store_files(reference[model])  # no temporary file left either
    assert not (out / LOCK_NAME).exists()


def test_at_most_one_shard_is_lost(tmp_path, data_root):
    out = tmp_path / "run.zarr"
    proc = drive("torn:4", out, data_root)  # dies writing shard 4 of the first pass
    assert proc.returncode == -signal.SIGKILL
    done = zarr.open_group(str(out), mode="r")["partial/done"][...]
    assert done.tolist() == [1, 1, 1, 0, 0, 0]


def test_up_to_date_rerun_does_no_pass_and_a_change_is_refused(tmp_path, data_root, reference):
    out = tmp_path / "run.zarr"
    cfg = RunConfig(limit=2400, shard_size=400, batch_size=200)
    first = compute(cfg, out, data_root=data_root, device="cpu")
    mtime = (out / "final" / "conv1.weight" / "c" / "0").stat().st_mtime_ns
    again = compute(cfg, out, data_root=data_root, device="cpu")
    assert again.up_to_date and again.passes == 0
    assert (out / "final" / "conv1.weight" / "c" / "0").stat().st_mtime_ns == mtime
    for (k, a), b in zip(
        first.model.state_dict().items(), again.model.state_dict().values(), strict=True
    ):
        assert a.equal(b), k  # the returned model carries the stored init
    refused = r"--mode: 'tensor' -> 'channel'.*--overwrite \(overwrite=True from Python\)"
    with pytest.raises(StoreError, match=refused):
        compute(RunConfig(limit=2400, shard_size=400, batch_size=200, mode="channel"), out,
                data_root=data_root, device="cpu")  # fmt: skip
    with pytest.raises(StoreError, match=r"dataset fingerprint: sha256:\w+ -> sha256:\w+"):
        compute(RunConfig(limit=2401, shard_size=400, batch_size=200), out,
                data_root=data_root, device="cpu")  # fmt: skip
    changed = compute(RunConfig(limit=2400, shard_size=400, batch_size=200, mode="channel"), out,
                      data_root=data_root, device="cpu", overwrite=True)  # fmt: skip
    assert changed.passes == 5 and not changed.up_to_date
    assert zarr.open_group(str(out), mode="r").attrs["config"]["mode"] == "channel"


def test_up_to_date_from_the_command_line(tmp_path, data_root, reference):
    proc = drive("none", reference["mj"], data_root)
    assert proc.returncode == 0, proc.stderr
    assert "up to date" in proc.stderr


def test_a_second_writer_is_refused_while_the_first_runs(tmp_path, data_root):
    out = tmp_path / "run.zarr"
    with writer_lock(out):  # this process is the writer
        proc = drive("none", out, data_root)
    assert proc.returncode == 1
    assert f"is being written by pid {os.getpid()} on host {socket.gethostname()}" in proc.stderr
    assert "Traceback" not in proc.stderr
    proc = drive("none", out, data_root)  # released: it runs
    assert proc.returncode == 0, proc.stderr


def test_a_stale_lock_of_a_dead_process_is_taken_over(tmp_path, data_root):
    out = tmp_path / "run.zarr"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True).stdout.strip()  # fmt: skip
    out.mkdir()
    owner = {"pid": int(dead), "host": socket.gethostname(), "start": None, "since": time.time()}
    (out / LOCK_NAME).write_text(json.dumps(owner))
    proc = subprocess.run(
        [
            sys.executable,
            str(DRIVER),
            "none",
            "compute",
            "--data-root",
            str(data_root),
            "--out",
            str(out),
            *ARGS[:-3],
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )  # fmt: skip  (with progress: the take-over note is shown)
    assert proc.returncode == 0, proc.stderr
    assert f"took over the lock of a writer that is gone (pid {dead})" in proc.stderr
    assert not (out / LOCK_NAME).exists()


def test_a_lock_recorded_by_a_live_process_without_flock_is_respected(tmp_path):
    out = tmp_path / "run.zarr"
    out.mkdir()
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        owner = {"pid": sleeper.pid, "host": socket.gethostname(), "start": None, "since": 0}
        (out / LOCK_NAME).write_text(json.dumps(owner))
        with pytest.raises(StoreError, match=rf"locked by pid {sleeper.pid}"), writer_lock(out):
            pass
    finally:
        sleeper.kill()
        sleeper.wait()


def test_ctrl_c_stops_after_the_batch_and_says_how_to_resume(tmp_path, data_root, reference):
    out = tmp_path / "run.zarr"
    proc = drive("sigint:9", out, data_root)  # Ctrl-C during the second layer's pass
    assert proc.returncode == 130, proc.stderr
    assert "Interrupted: interrupted during '[2/5] conv2' with 1 of 5 layers solved" in (
        proc.stderr
    )
    assert "rerun the same command to resume" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (out / LOCK_NAME).exists()
    done = zarr.open_group(str(out), mode="r")["partial/done"][...]
    assert done.tolist() == [1, 1, 1, 0, 0, 0]  # the shards before the batch in flight
    proc = drive("none", out, data_root)
    assert proc.returncode == 0 and "(resumed)" in proc.stderr
    assert_same_bytes(out, reference["mj"])


def small_cnn(kernel=3, seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Conv2d(1, 4, kernel, padding=kernel // 2),
        torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(1),
        torch.nn.Flatten(),
        torch.nn.Linear(4, 10),
    )


API = RunConfig(limit=600, shard_size=300, batch_size=150, holdout=None)


def test_another_initial_state_or_structure_is_not_up_to_date(tmp_path, data_root):
    out = tmp_path / "run.zarr"
    first = compute(API, out, model=small_cnn(seed=0), data_root=data_root, device="cpu")
    same = compute(API, out, model=small_cnn(seed=0), data_root=data_root, device="cpu")
    assert same.up_to_date
    seed = r"model initial state: sha256:\w+ -> sha256:\w+ \(other initial weights: another seed"
    with pytest.raises(StoreError, match=seed + r".*--overwrite"):
        compute(API, out, model=small_cnn(seed=1), data_root=data_root, device="cpu")
    layers = r"model structure: sha256:\w+ -> sha256:\w+ \(other layers or layer settings\)"
    with pytest.raises(StoreError, match=layers):
        compute(API, out, model=small_cnn(kernel=5), data_root=data_root, device="cpu")
    other = compute(API, out, model=small_cnn(seed=1), data_root=data_root, device="cpu",
                    overwrite=True)  # fmt: skip
    assert not other.up_to_date and other.passes == 2
    w0, w1 = first.model[0].weight, other.model[0].weight
    assert not torch.equal(w0, w1)  # a seed sweep gets one init per seed


def test_a_callers_model_is_recorded_as_given_not_as_the_default(tmp_path, data_root):
    out = tmp_path / "run.zarr"
    compute(API, out, model=small_cnn(), data_root=data_root, device="cpu")
    attrs = zarr.open_group(str(out), mode="r").attrs
    assert attrs["model"]["source"] == "caller"
    assert attrs["model"]["class"] == "torch.nn.modules.container.Sequential"
    assert attrs["config"]["model"] is None and attrs["config"]["seed"] is None
    shown = CliRunner().invoke(cli, ["show", str(out)])
    assert "model     torch.nn.modules.container.Sequential (given by the caller)" in shown.output
    built = tmp_path / "built.zarr"
    compute(API, built, data_root=data_root, device="cpu")
    model = zarr.open_group(str(built), mode="r").attrs["model"]
    assert model["source"] == "built" and model["name"] == "mj" and model["seed"] == 0
    assert (
        "lsuv_pipeline.models.MJ (mj, seed 0)"
        in CliRunner().invoke(cli, ["show", str(built)]).output
    )
