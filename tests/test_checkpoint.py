"""Loading, inspecting and exporting finished runs; the shipped checkpoint; bad stores."""

import io
import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch
import zarr
from click.testing import CliRunner

from lsuv_pipeline import RunConfig, compute, export, load_init, mj, open_run
from lsuv_pipeline.cli import cli
from lsuv_pipeline.config import DEFAULT_TOL
from lsuv_pipeline.errors import StoreError

REPO = Path(__file__).resolve().parents[1]
SHIPPED = REPO / "data" / "mnist-mj.zarr"


@pytest.fixture(scope="module")
def small_run(tmp_path_factory, data_root):
    out = tmp_path_factory.mktemp("ckpt") / "run.zarr"
    result = compute(RunConfig(limit=1000, shard_size=500), out, data_root=data_root, device="cpu")
    return out, result.model


def same_state(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_load_init_round_trip(small_run):
    out, solved = small_run
    fresh = mj()
    assert not same_state(fresh, solved)
    assert load_init(fresh, out) is fresh
    assert same_state(fresh, solved)


def test_a_model_that_does_not_fit_is_left_untouched(small_run):
    out, _ = small_run
    other = mj(num_classes=7)  # l1 is (7, 32), the store has (10, 32)
    before = {k: v.clone() for k, v in other.state_dict().items()}
    with pytest.raises(StoreError, match=r"l1.weight: shape \(10, 32\) in the store, \(7, 32\)"):
        load_init(other, out)
    assert all(torch.equal(before[k], v) for k, v in other.state_dict().items())
    wider = torch.nn.Sequential(mj())
    with pytest.raises(StoreError, match="missing from the store"):
        load_init(wider, out)
    double = mj().double()
    with pytest.raises(StoreError, match=r"dtype torch.float32 in the store, torch.float64"):
        load_init(double, out)


def test_non_strict_loads_the_names_both_have(small_run):
    out, solved = small_run

    class Bigger(torch.nn.Module):
        def __init__(self):
            super().__init__()
            m = mj()
            self.conv1, self.conv2, self.conv3, self.conv4, self.l1 = (
                m.conv1, m.conv2, m.conv3, m.conv4, m.l1
            )  # fmt: skip
            self.extra = torch.nn.Linear(2, 2)

    model = Bigger()
    extra = model.extra.weight.clone()
    load_init(model, out, strict=False)
    assert torch.equal(model.conv3.weight, solved.conv3.weight)
    assert torch.equal(model.extra.weight, extra)


def test_incomplete_store_is_refused(tmp_path, small_run):
    out, _ = small_run
    copy = tmp_path / "copy.zarr"
    shutil.copytree(out, copy)
    g = zarr.open_group(str(copy), mode="r+")
    g.attrs["status"] = "running"
    model = mj()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(StoreError, match="not complete"):
        load_init(model, copy)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_open_run_gives_config_layers_and_statistics(small_run):
    out, _ = small_run
    run = open_run(out)
    assert run.status == "complete" and run.config.limit == 1000
    assert [i.name for i in run.layers] == ["conv1", "conv2", "conv3", "conv4", "l1"]
    m = run.moments("verify/train", "conv2")
    assert m.count == 1000 * 15 * 15 and m.mean.shape == (16,)
    layer = run.layer("conv2")
    assert layer["passes"] == 1 and layer["scale"].shape == ()
    assert set(run.state("initial")) == set(run.state("final"))
    assert "conv4" in run.table()


def test_export_writes_a_weights_only_state_dict(tmp_path, small_run):
    out, solved = small_run
    path = export(out, tmp_path / "init.pt")
    state = torch.load(path, weights_only=True)
    assert state.keys() == solved.state_dict().keys()
    assert all(torch.equal(state[k], v) for k, v in solved.state_dict().items())


def test_export_writes_what_torch_save_writes(tmp_path, small_run):
    out, _ = small_run
    state = open_run(out).state("final")
    torch.save(state, tmp_path / "ref.pt")
    old = os.umask(0o022)
    try:
        path = export(out, tmp_path / "init.pt")
    finally:
        os.umask(old)
    assert path.stat().st_mode & 0o777 == 0o644  # a new file's mode, not a temp file's 0600
    with zipfile.ZipFile(path) as got, zipfile.ZipFile(tmp_path / "ref.pt") as ref:
        assert {n.replace("init/", "ref/", 1) for n in got.namelist()} == set(ref.namelist())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["init.pt", "ref.pt"]  # no temp left


def test_export_needs_an_existing_folder_and_dash_is_stdout(tmp_path, small_run):
    out, _ = small_run
    missing = tmp_path / "no" / "such" / "dir" / "x.pt"
    with pytest.raises(StoreError, match=r"its folder .*dir' does not exist"):
        export(out, missing)
    assert not (tmp_path / "no").exists()
    result = CliRunner().invoke(cli, ["export", str(out), "--out", str(missing)])
    assert result.exit_code == 1 and "does not exist" in result.stderr
    script = Path(sys.executable).with_name("lsuv-pipeline")
    proc = subprocess.run([str(script), "export", str(out), "--out", "-"], cwd=tmp_path,
                          capture_output=True, timeout=120)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert not (tmp_path / "-").exists()
    state = torch.load(io.BytesIO(proc.stdout), weights_only=True)
    assert all(torch.equal(state[k], v) for k, v in open_run(out).state("final").items())


# -- the shipped checkpoint ---------------------------------------------------------


def test_shipped_checkpoint_loads_by_name_and_solves_mnist():
    model = load_init(mj(), "mnist-mj")
    run = open_run("mnist-mj")
    assert run.path.resolve() == SHIPPED.resolve()
    # the documented command: all defaults, the tolerance as a float32 model resolves it
    assert run.config == RunConfig(tol=DEFAULT_TOL) and RunConfig().tol is None
    assert run.attrs["dataset"]["count"] == 60000
    final = run.state("final")
    assert all(torch.equal(final[k], v) for k, v in model.state_dict().items())


def test_shipped_checkpoint_loads_by_name_from_an_installed_wheel(tmp_path):
    wheels, site = tmp_path / "wheels", tmp_path / "site"
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run([*pip, "wheel", str(REPO), "--no-deps", "--no-build-isolation",
                    "-w", str(wheels)], check=True, capture_output=True)  # fmt: skip
    (wheel,) = wheels.glob("lsuv_pipeline-*.whl")
    subprocess.run([*pip, "install", "--no-deps", "--target", str(site), str(wheel)],
                   check=True, capture_output=True)  # fmt: skip
    code = (
        "import json, lsuv_pipeline\n"
        "from lsuv_pipeline import load_init, mj\n"
        "from lsuv_pipeline.checkpoint import resolve_checkpoint\n"
        "m = load_init(mj(), 'mnist-mj')\n"
        "print(json.dumps({'module': lsuv_pipeline.__file__, "
        "'store': str(resolve_checkpoint('mnist-mj')), "
        "'bias': m.conv4.bias.tolist()}))\n"
    )
    env = {"PYTHONPATH": str(site), "PATH": "/usr/bin:/bin"}
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, env=env
    )
    assert proc.returncode == 0, proc.stderr
    got = json.loads(proc.stdout)
    assert got["module"].startswith(str(site)) and got["store"].startswith(str(site))
    assert got["bias"] == load_init(mj(), SHIPPED).conv4.bias.tolist()


def test_verify_and_show_and_export_on_the_shipped_checkpoint(tmp_path, data_root):
    runner = CliRunner()
    result = runner.invoke(cli, ["verify", "mnist-mj", "--data-root", str(data_root)])
    assert result.exit_code == 0, result.output
    assert "all 5 layers within 0.0001 on train" in result.stderr
    result = runner.invoke(
        cli, ["verify", "mnist-mj", "--data-root", str(data_root), "--split", "test"]
    )
    assert result.exit_code == 0  # the held-out split is reported, not judged
    assert "test is held out: measured, not judged" in result.stderr
    result = runner.invoke(cli, ["show", "mnist-mj"])
    assert result.exit_code == 0 and "status    complete" in result.output
    result = runner.invoke(cli, ["export", "mnist-mj", "--out", str(tmp_path / "m.pt")])
    assert result.exit_code == 0
    state = torch.load(tmp_path / "m.pt", weights_only=True)
    assert set(state) == set(mj().state_dict())


# -- bad stores ---------------------------------------------------------------------


def damaged(tmp_path, small_run, how):
    out, _ = small_run
    copy = tmp_path / "bad.zarr"
    shutil.copytree(out, copy)
    how(copy)
    return copy


def chunk(store: Path, array: str) -> Path:
    """The one chunk file of a small array (``c/0`` or ``c/0/0/0/0``)."""
    (path,) = [f for f in (store / array / "c").rglob("*") if f.is_file()]
    return path


BAD = {
    "truncated chunk": (
        lambda p: chunk(p, "final/conv2.weight").write_bytes(
            chunk(p, "final/conv2.weight").read_bytes()[:40]
        ),
        r"final/conv2.weight' cannot be read",
    ),
    "missing chunk": (
        lambda p: chunk(p, "final/conv3.bias").unlink(),
        r"final/conv3.bias' does not match its recorded checksum",
    ),
    "missing array": (
        lambda p: shutil.rmtree(p / "final/l1.weight"),
        r"array 'final/l1.weight' is missing",
    ),
    "unknown schema": (
        lambda p: zarr.open_group(str(p), mode="r+").attrs.update({"schema": 99}),
        r"has store schema 99; this version of lsuv-pipeline reads schema 1",
    ),
    "not a run": (
        lambda p: (shutil.rmtree(p), zarr.open_group(str(p), mode="w")),
        r"is a Zarr group but not a run store",
    ),
    "not zarr": (lambda p: (p / "zarr.json").unlink(), r"is not a Zarr group"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_store_is_one_clear_error_and_leaves_the_model_alone(tmp_path, small_run, case):
    how, message = BAD[case]
    path = damaged(tmp_path, small_run, how)
    model = mj()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(StoreError, match=message) as info:
        load_init(model, path)
    assert str(path) in str(info.value)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    for command in (["show", str(path)], ["export", str(path), "--out", str(tmp_path / "x.pt")]):
        result = CliRunner().invoke(cli, command)
        if case in ("truncated chunk", "missing chunk", "missing array") and command[0] == "show":
            continue  # show reads statistics, not the final weights
        assert result.exit_code == 1, (command, result.output)
        assert result.stderr.startswith("Error: ") and len(result.stderr.strip().splitlines()) == 1
        assert "Traceback" not in result.output
