"""The store under faults and damage: one error line, nothing called complete that is not.

Faults are made for real where this machine lets a test make them (a small tmpfs for a
full disk, a read-only bind mount), and by making the file system call fail otherwise, so
that every machine tests the mechanism.
"""

import errno
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import zarr
from click.testing import CliRunner

from lsuv_pipeline import RunConfig, compute, export, load_init, mj, open_run
from lsuv_pipeline.cli import cli
from lsuv_pipeline.errors import ReadOnlyStore, StoreError
from lsuv_pipeline.progress import Progress
from tests.stores import assert_same_bytes, store_files

ARGS = ["--limit", "1200", "--shard-size", "400", "--batch-size", "200", "-q", "--device", "cpu"]
CONFIG = RunConfig(limit=1200, shard_size=400, batch_size=200)


def invoke(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def error_line(stderr: str) -> str:
    """The one error line a failed command ends with (notes may come before it)."""
    lines = [line for line in stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("Error: ")]
    assert len(errors) == 1 and lines[-1] == errors[0], stderr
    assert "Traceback" not in stderr
    return errors[0]


def one_line(result, *needles, code=1):
    assert result.exit_code == code, (result.exit_code, result.output, result.stderr)
    line = error_line(result.stderr)
    assert "Traceback" not in result.output
    for needle in needles:
        assert needle in line, line
    return line


@pytest.fixture(scope="module")
def reference(tmp_path_factory, data_root):
    out = tmp_path_factory.mktemp("ref") / "run.zarr"
    result = invoke("compute", "--data-root", data_root, "--out", out, *ARGS)
    assert result.exit_code == 0, result.stderr
    return out


def copy_of(reference, tmp_path, name="copy.zarr") -> Path:
    path = tmp_path / name
    shutil.copytree(reference, path)
    return path


# -- a store deleted or replaced under its writer ---------------------------------------


class AtPass(Progress):
    """Runs ``action`` when the pass whose label starts with ``label`` begins."""

    def __init__(self, label, action):
        self.label, self.action, self.done = label, action, False

    def pass_started(self, label, total):
        if not self.done and label.startswith(self.label):
            self.done = True
            self.action()


@pytest.mark.parametrize("label", ["[3/5]", "verify test"], ids=["mid-solve", "verify-test"])
def test_a_store_deleted_while_compute_runs_is_noticed_and_not_rebuilt(tmp_path, data_root, label):
    out = tmp_path / "run.zarr"
    progress = AtPass(label, lambda: shutil.rmtree(out))
    with pytest.raises(StoreError, match=r"was deleted or replaced while this run was writing"):
        compute(CONFIG, out, data_root=data_root, device="cpu", progress=progress)
    assert progress.done
    assert not (out / "zarr.json").exists()  # nothing rebuilt a "complete" store there
    again = compute(CONFIG, out, data_root=data_root, device="cpu")  # a rerun starts over
    assert not again.up_to_date and again.passes == 5


def test_a_store_replaced_while_compute_runs_is_noticed(tmp_path, data_root, reference):
    out = tmp_path / "run.zarr"

    def replace():
        shutil.rmtree(out)
        shutil.copytree(reference, out)

    with pytest.raises(StoreError, match=r"was deleted or replaced"):
        compute(CONFIG, out, data_root=data_root, device="cpu", progress=AtPass("[2/5]", replace))
    assert_same_bytes(out, reference)  # the other store is left as it was


# -- a full disk, a read-only folder, a path through a file ------------------------------


def failing_writes(monkeypatch, code, after):
    """Make the store's file writes fail with ``code`` after ``after`` of them."""
    from zarr.storage import _local

    real, count = _local._put, [0]

    def put(path, value, exclusive=False):
        count[0] += 1
        if count[0] > after:
            raise OSError(code, os.strerror(code), str(path))
        return real(path, value, exclusive=exclusive)

    monkeypatch.setattr(_local, "_put", put)


def test_a_full_disk_is_one_error_and_the_run_resumes_to_the_same_bytes(
    tmp_path, data_root, reference, monkeypatch
):
    out = tmp_path / "run.zarr"
    failing_writes(monkeypatch, errno.ENOSPC, after=150)
    with pytest.raises(StoreError, match=r"no space left on the device .* rerun the same command"):
        compute(CONFIG, out, data_root=data_root, device="cpu")
    monkeypatch.undo()
    assert zarr.open_group(str(out), mode="r").attrs["status"] == "running"
    result = invoke("compute", "--data-root", data_root, "--out", out, *ARGS)
    assert result.exit_code == 0 and "(resumed)" in result.output, result.stderr
    assert_same_bytes(out, reference)
    assert store_files(out) == store_files(reference)


def can_mount() -> bool:
    if os.geteuid() != 0 or shutil.which("mount") is None:
        return False
    probe = Path(f"/tmp/lsuv-mount-probe-{os.getpid()}")
    probe.mkdir(exist_ok=True)
    ok = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(probe)],
                        capture_output=True).returncode == 0  # fmt: skip
    if ok:
        subprocess.run(["umount", str(probe)], check=True)
    probe.rmdir()
    return ok


MOUNTS = pytest.mark.skipif(not can_mount(), reason="mounting file systems is not permitted here")


@pytest.fixture
def small_disk(tmp_path):
    where = tmp_path / "disk"
    where.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=600k", "tmpfs", str(where)], check=True)
    yield where
    subprocess.run(["umount", str(where)], check=True)


def lsuv(*args, **kwargs):
    script = Path(sys.executable).with_name("lsuv-pipeline")
    return subprocess.run([str(script), *map(str, args)], capture_output=True, text=True,
                          timeout=600, **kwargs)  # fmt: skip


@MOUNTS
def test_a_real_full_disk_ends_in_one_line_and_resumes_once_there_is_room(
    small_disk, data_root, reference
):
    out = small_disk / "run.zarr"
    proc = lsuv("compute", "--data-root", data_root, "--out", out, *ARGS)
    assert proc.returncode == 1, proc.stderr
    assert error_line(proc.stderr).startswith("Error: no space left on the device")
    subprocess.run(["mount", "-o", "remount,size=64m", str(small_disk)], check=True)
    proc = lsuv("compute", "--data-root", data_root, "--out", out, *ARGS)
    assert proc.returncode == 0, proc.stderr
    assert "(resumed)" in proc.stderr
    assert_same_bytes(out, reference)
    assert store_files(out) == store_files(reference)


@pytest.fixture
def read_only_copy(tmp_path, reference):
    """A complete store in a folder that is mounted read-only."""
    src = tmp_path / "src"
    src.mkdir()
    shutil.copytree(reference, src / "run.zarr")
    ro = tmp_path / "ro"
    ro.mkdir()
    subprocess.run(["mount", "--bind", str(src), str(ro)], check=True)
    subprocess.run(["mount", "-o", "remount,ro,bind", str(ro)], check=True)
    yield ro
    subprocess.run(["umount", str(ro)], check=True)


@MOUNTS
def test_a_read_only_folder_is_up_to_date_or_one_line(read_only_copy, data_root, tmp_path):
    out = read_only_copy / "run.zarr"
    proc = lsuv("compute", "--data-root", data_root, "--out", out, *ARGS)
    assert proc.returncode == 0 and "is up to date" in proc.stderr, proc.stderr
    proc = lsuv("compute", "--data-root", data_root, "--out", out, *ARGS, "--mode", "channel")
    assert proc.returncode == 1
    assert error_line(proc.stderr) == (
        f"Error: {str(out)!r} is on a read-only file system (writing its lock file)"
    )
    proc = lsuv("compute", "--data-root", data_root, "--out", read_only_copy / "new.zarr", *ARGS)
    assert proc.returncode == 1 and "read-only file system" in proc.stderr
    proc = lsuv("export", out, "--out", read_only_copy / "init.pt")
    assert proc.returncode == 1 and "read-only file system" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_an_unwritable_folder_is_still_up_to_date_but_cannot_be_recomputed(
    tmp_path, data_root, reference, monkeypatch
):
    out = copy_of(reference, tmp_path)
    from lsuv_pipeline import lock

    def refuse(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(lock, "_open_locked", refuse)
    assert compute(CONFIG, out, data_root=data_root, device="cpu").up_to_date
    with pytest.raises(ReadOnlyStore, match=r"read-only file system \(writing its lock file\)"):
        compute(RunConfig(limit=1200, shard_size=400, batch_size=200, mode="channel"), out,
                data_root=data_root, device="cpu")  # fmt: skip


def test_export_to_an_unwritable_place_is_one_error(tmp_path, reference, monkeypatch):
    import tempfile

    def refuse(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(tempfile, "mkdtemp", refuse)
    with pytest.raises(StoreError, match=r"read-only file system \(writing the exported weights\)"):
        export(reference, tmp_path / "init.pt")


def test_out_below_a_regular_file_is_one_error(tmp_path, data_root):
    (tmp_path / "afile").write_text("x")
    result = invoke("compute", "--data-root", data_root, "--out", tmp_path / "afile/run.zarr",
                    *ARGS)  # fmt: skip
    one_line(result, "a part of the path is a file, not a folder")
    assert (tmp_path / "afile").read_text() == "x"


# -- failed starts leave nothing ---------------------------------------------------------


def broken_jpegs(tmp_path) -> str:
    from PIL import Image

    (tmp_path / "pics" / "a").mkdir(parents=True)
    for i in range(4):
        Image.new("RGB", (40, 40), (i * 40, 0, 0)).save(tmp_path / "pics" / "a" / f"{i}.jpg")
    first = tmp_path / "pics" / "a" / "0.jpg"
    first.write_bytes(first.read_bytes()[:100])  # truncated
    return f"imagefolder:{tmp_path / 'pics'}"


# fmt: off
JPEG_ARGS = ["--dataset", "JPEGS", "--model", "resnet18", "--holdout", "none",
             "--data-option", "resize=36", "--data-option", "crop=32"]  # fmt: skip
FAILED_STARTS = {
    "include matches nothing": (["--include", "nope"], "matches no conv / linear layer"),
    "no target layer": (["--model", "tests.fixtures.user_models:no_layers"], "nothing to"),
    "unreachable scheduler": (
        ["--scheduler", "tcp://127.0.0.1:9", "--scheduler-timeout", "2"],
        "cannot reach the dask scheduler",
    ),
    "bad scheduler file": (["--scheduler-file", "SCHEDFILE"], "is not a dask scheduler file"),
    "truncated jpeg": (JPEG_ARGS, "cannot read image"),
}


@pytest.mark.parametrize("case", list(FAILED_STARTS))
def test_a_run_that_fails_before_writing_leaves_nothing(tmp_path, data_root, case):
    args, message = FAILED_STARTS[case]
    sched = tmp_path / "sched.json"
    sched.write_text("{}")
    args = [str(sched) if a == "SCHEDFILE" else a for a in args]
    args = [broken_jpegs(tmp_path) if a == "JPEGS" else a for a in args]
    out = tmp_path / "new" / "deeper" / "run.zarr"
    result = invoke("compute", "--data-root", data_root, "--out", out, *ARGS, *args)
    one_line(result, message, code=2 if case == "include matches nothing" else 1)
    assert not (tmp_path / "new").exists()


# -- a scheduler file that is not one ------------------------------------------------------


@pytest.mark.parametrize("content", ["x", "{}", "[1, 2]", '{"address": 7}'])
def test_a_file_that_is_not_a_scheduler_file_is_one_error(tmp_path, data_root, content):
    path = tmp_path / "sched"
    path.write_text(content)
    result = invoke("compute", "--data-root", data_root, "--out", tmp_path / "r.zarr", *ARGS,
                    "--scheduler-file", path)  # fmt: skip
    one_line(result, f"scheduler file {str(path)!r}")


# -- damage -----------------------------------------------------------------------------


def edit_json(path: Path, change) -> None:
    meta = json.loads(path.read_text())
    change(meta)
    path.write_text(json.dumps(meta))


def chunk(store: Path, array: str) -> Path:
    (path,) = [f for f in (store / array / "c").rglob("*") if f.is_file()]
    return path


def flip_a_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


# fmt: off
DAMAGE = {
    "corrupt final/zarr.json": (
        lambda p: (p / "final" / "zarr.json").write_text("{not json"), "'final'"),
    "corrupt final/<param>/zarr.json": (
        lambda p: (p / "final" / "conv2.weight" / "zarr.json").write_text("{"),
        "final/conv2.weight"),
    "edited torch_dtype": (
        lambda p: edit_json(p / "final" / "l1.bias" / "zarr.json",
                            lambda m: m["attributes"].update(torch_dtype="float64")),
        "records dtype 'float64' but holds float32 values"),
    "emptied layers": (
        lambda p: edit_json(p / "zarr.json", lambda m: m["attributes"].update(layers=[])),
        "root attribute 'layers' is damaged"),
    "a layer left out of the list": (
        lambda p: edit_json(p / "zarr.json", lambda m: m["attributes"].update(
            layers=m["attributes"]["layers"][:-1])),
        "layers/ holds l1, which the run's 'layers' attribute does not list"),
    "dataset of the wrong type": (
        lambda p: edit_json(p / "zarr.json", lambda m: m["attributes"].update(dataset="x")),
        "root attribute 'dataset' is damaged (expected a JSON dict, got str)"),
    "config of the wrong type": (
        lambda p: edit_json(p / "zarr.json", lambda m: m["attributes"].update(config="ops")),
        "root attribute 'config' is damaged"),
}
# fmt: on


@pytest.mark.parametrize("case", list(DAMAGE))
def test_damaged_metadata_is_one_error_for_every_reader(tmp_path, data_root, reference, case):
    how, message = DAMAGE[case]
    path = copy_of(reference, tmp_path)
    how(path)
    model = mj()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(StoreError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_init(model, path)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    for command in (["verify", path, "--data-root", data_root, "-q"],
                    ["export", path, "--out", tmp_path / "x.pt"]):  # fmt: skip
        one_line(invoke(*command), message)
    if "final" not in case and "dtype" not in case:
        one_line(invoke("show", path), message)  # show reads statistics, not weights


UNREAD = {
    "flipped byte in layers/conv2/var": lambda p: flip_a_byte(chunk(p, "layers/conv2/var")),
    "deleted chunk of initial/conv3.weight": lambda p: chunk(p, "initial/conv3.weight").unlink(),
    "edited torch_dtype of verify/test/l1/mean": lambda p: edit_json(
        p / "verify/test/l1/mean/zarr.json",
        lambda m: m["attributes"].update(torch_dtype="int64"),
    ),
}


@pytest.mark.parametrize("case", list(UNREAD))
def test_verify_checks_every_array_of_the_store(tmp_path, data_root, reference, case):
    path = copy_of(reference, tmp_path)
    UNREAD[case](path)
    where = case.split(" of ")[-1].split(" in ")[-1]
    line = one_line(invoke("verify", path, "--data-root", data_root, "-q"), "is damaged", where)
    assert str(path) in line
    load_init(mj(), path)  # what load_init reads is intact: it loads


def test_a_zarr_temporary_file_a_kill_left_is_removed_on_resume(tmp_path, data_root, reference):
    out = tmp_path / "run.zarr"

    def stop():
        raise KeyboardInterrupt  # stop the run mid-way, as a kill would

    with pytest.raises(KeyboardInterrupt):
        compute(CONFIG, out, data_root=data_root, device="cpu", progress=AtPass("[3/5]", stop))
    left = out / "final" / f"conv1.weight.{'0' * 31}1.partial"
    left.parent.mkdir(parents=True, exist_ok=True)
    left.write_bytes(b"")  # a 0-byte temp file, as a SIGKILL during a write leaves
    (out / "layers" / f"zarr.{'ab' * 16}.partial").write_bytes(b"")
    result = invoke("compute", "--data-root", data_root, "--out", out, *ARGS)
    assert result.exit_code == 0 and "(resumed)" in result.output, result.stderr
    assert store_files(out) == store_files(reference)
    assert_same_bytes(out, reference)


def test_open_run_and_show_read_a_good_store(reference):
    run = open_run(reference)
    run.check()
    assert invoke("show", reference).exit_code == 0


# -- the store outside the tool ------------------------------------------------------


def test_xarray_opens_the_moments_with_named_dimensions(reference):
    xr = pytest.importorskip("xarray")
    layer = xr.open_zarr(reference, group="layers/conv2", consolidated=True)
    assert layer["mean"].dims == ("channel",) and layer.sizes["channel"] == 16
    assert layer["var"].dims == ("channel",) and layer["scale"].dims == ()
    after = xr.open_zarr(reference, group="verify/test/conv2", consolidated=True)
    assert after["mean"].dims == ("channel",)
    final = xr.open_zarr(reference, group="final", consolidated=True)
    assert final["conv2.weight"].dims == tuple(f"conv2.weight.dim{i}" for i in range(4))
    tree = xr.open_datatree(reference, engine="zarr", consolidated=True)
    assert float(tree["layers/l1/var"].mean()) > 0
    root = json.loads((reference / "zarr.json").read_text())
    assert "layers/conv2/mean" in root["consolidated_metadata"]["metadata"]


def test_stale_consolidated_metadata_is_found_by_verify(tmp_path, data_root, reference):
    path = copy_of(reference, tmp_path)
    meta = path / "layers" / "conv2" / "mean" / "zarr.json"
    doc = json.loads(meta.read_text())
    doc["dimension_names"] = ["other"]
    meta.write_text(json.dumps(doc))
    result = invoke("verify", path, "--data-root", data_root, "-q", "--device", "cpu")
    one_line(result, "'layers/conv2/mean': its metadata differs from the consolidated copy")


def _unretrieved_on_zarrs_loop(exc: BaseException) -> None:
    """A future of zarr's event loop that fails with ``exc`` and is dropped unawaited, as
    zarr leaves one write of several when another has failed first."""
    import asyncio
    import gc

    from zarr.core.sync import _get_loop

    loop = _get_loop()

    async def drop() -> None:
        loop.create_future().set_exception(exc)

    asyncio.run_coroutine_threadsafe(drop(), loop).result()
    gc.collect()
    asyncio.run_coroutine_threadsafe(asyncio.sleep(0), loop).result()


def test_a_write_failing_beside_a_reported_one_prints_no_traceback(caplog):
    """A full disk is one line: a write zarr ran beside the one that failed, and nobody
    awaited, fails too (seen: FileExistsError on a zarr.json), and asyncio would print its
    traceback at exit after the error line. Other leftovers are still shown."""
    from lsuv_pipeline import zarrio

    zarrio.failed_write()  # as a write that failed and was reported does
    with caplog.at_level("ERROR", logger="asyncio"):
        _unretrieved_on_zarrs_loop(FileExistsError(17, "File exists"))
        assert not [r for r in caplog.records if "never retrieved" in r.getMessage()]
        _unretrieved_on_zarrs_loop(ValueError("not a write"))
        assert [r for r in caplog.records if "never retrieved" in r.getMessage()]
