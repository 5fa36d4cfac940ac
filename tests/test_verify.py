"""Verification of a finished run: every array checked, every layer measured again."""

import pytest
import torch
from click.testing import CliRunner

from lsuv_pipeline import RunConfig, compute, verify
from lsuv_pipeline.cli import OFF_TARGET, cli
from lsuv_pipeline.errors import ConfigError, ModelError

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


def test_a_tighter_tolerance_or_the_held_out_split_can_fail(run, data_root):
    assert verify(run, data_root=data_root, device="cpu", tol=1e-12).failures
    held_out = verify(run, data_root=data_root, device="cpu", split="test")
    assert held_out.failures and held_out.split == "test"
    result = CliRunner().invoke(
        cli, ["verify", str(run), "--data-root", str(data_root), "-q", "--split", "test"]
    )
    assert result.exit_code == OFF_TARGET and "miss tol 0.0001 on test" in result.stderr


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
