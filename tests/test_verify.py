"""Verification of a finished run: every array checked, every layer measured again."""

import pytest
import torch
from click.testing import CliRunner

from lsuv_pipeline import RunConfig, compute, verify
from lsuv_pipeline.cli import OFF_TARGET, cli
from lsuv_pipeline.errors import ConfigError, ModelError
from lsuv_pipeline.moments import reduce_channels

CFG = RunConfig(limit=800, shard_size=400, batch_size=200)


@pytest.fixture(scope="module")
def run(tmp_path_factory, data_root):
    out = tmp_path_factory.mktemp("verify") / "run.zarr"
    compute(CFG, out, data_root=data_root, device="cpu")
    return out


def test_a_fresh_run_verifies_on_its_solve_split(run, data_root):
    result = verify(run, data_root=data_root, device="cpu")
    assert result.ok and [s.name for s in result.layers] == [
        "conv1",
        "conv2",
        "conv3",
        "conv4",
        "l1",
    ]
    m = result.layers[0].after["train"]
    assert m.count == 800 * 13 * 13 and abs(m.mean.mean().item()) < 1e-4


def test_a_tighter_tolerance_fails_and_a_held_out_split_is_judged_only_when_asked(run, data_root):
    assert verify(run, data_root=data_root, device="cpu", tol=1e-12).failures
    held_out = verify(run, data_root=data_root, device="cpu", split="test")
    assert held_out.ok and held_out.tol is None and held_out.split == "test"
    assert "OFF TARGET" not in held_out.table()
    l1 = reduce_channels(held_out.layers[-1].after["test"])
    assert 1e-4 < abs(l1.std.item() - 1) < 0.1  # near the target, not at it
    assert verify(run, data_root=data_root, device="cpu", split="test", holdout_tol=1e-4).failures
    assert verify(run, data_root=data_root, device="cpu", split="test", holdout_tol=0.5).ok
    argv = ["verify", str(run), "--data-root", str(data_root), "--split", "test"]
    result = CliRunner().invoke(cli, [*argv, "-q"])  # the verdict stays with -q
    assert result.exit_code == 0 and "test is held out: measured, not judged" in result.stderr
    result = CliRunner().invoke(cli, [*argv, "--holdout-tol", "1e-4"])
    assert result.exit_code == OFF_TARGET and "miss tol 0.0001 on test" in result.stderr


def test_a_run_on_the_callers_data_says_how_to_verify_it(tmp_path, data_root):
    from lsuv_pipeline.data import DatasetSpec, open_source

    train = open_source(DatasetSpec(name="fashion-mnist", root=str(data_root), limit=600))
    samples = [train.batch(0, 300), train.batch(300, 600)]  # batches, as a loader gives
    out = tmp_path / "mine.zarr"
    cfg = RunConfig(dataset="fashion-mnist-600", limit=None, shard_size=300, batch_size=150,
                    holdout=None)  # fmt: skip
    compute(cfg, out, data=samples, device="cpu")
    result = CliRunner().invoke(cli, ["verify", str(out)])
    assert result.exit_code == 2, result.output
    line = result.stderr.strip()
    assert "given by the caller" in line and "fashion-mnist-600" in line and "data=" in line
    assert "unknown dataset" not in line and "Traceback" not in line
    assert verify(out, data=samples, device="cpu").ok


def small():
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Conv2d(1, 4, 3), torch.nn.Flatten(), torch.nn.Linear(2704, 10)
    )


def test_a_run_of_a_callers_model_needs_that_model_and_refuses_another(tmp_path, data_root):
    out = tmp_path / "mine.zarr"
    compute(CFG, out, model=small(), data_root=data_root, device="cpu")
    with pytest.raises(ConfigError, match=r"was given by the caller, so verify cannot build it"):
        verify(out, data_root=data_root, device="cpu")
    assert verify(out, model=small(), data_root=data_root, device="cpu").ok
    other = torch.nn.Sequential(
        torch.nn.Conv2d(1, 4, 3, padding=1), torch.nn.Flatten(), torch.nn.Linear(3136, 10)
    )
    with pytest.raises(ModelError, match="does not have the structure of the run's model"):
        verify(out, model=other, data_root=data_root, device="cpu")
