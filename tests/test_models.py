"""Models by name, a user's own factory, layer selection, and the statistics plot."""

import numpy as np
import pytest
import torch
import zarr
from click.testing import CliRunner

from lsuv_pipeline import RunConfig, compute, open_run
from lsuv_pipeline import moments as mom
from lsuv_pipeline.cli import cli
from lsuv_pipeline.errors import ConfigError, ModelError
from lsuv_pipeline.layers import select, trace
from lsuv_pipeline.models import ModelSpec, build_model

USER = "tests.fixtures.user_models"


def pooled(g, section, name):
    """Whole-tensor mean and std of a layer from its stored per-channel moments."""
    n = int(g[f"{section}/{name}/count"][0])
    m = mom.Moments(
        n,
        torch.from_numpy(g[f"{section}/{name}/mean"][...]),
        torch.from_numpy(g[f"{section}/{name}/var"][...]) * n,
    )
    t = mom.reduce_channels(m)
    return t.mean.item(), t.std.item()


def test_torchvision_models_are_built_for_the_data_and_seeded():
    a = build_model(ModelSpec(name="resnet18"), seed=3, in_channels=1, num_classes=7)
    b = build_model(ModelSpec(name="resnet18"), seed=3, in_channels=1, num_classes=7)
    assert a.conv1.in_channels == 1 and a.fc.out_features == 7
    assert all(
        torch.equal(x, y)
        for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True)
    )
    m = build_model(ModelSpec(name="mobilenet_v3_small"), seed=0, in_channels=1, num_classes=10)
    assert m(torch.randn(2, 1, 32, 32)).shape == (2, 10)
    assert m.training  # built as torchvision builds it


def test_unknown_model_and_bad_factories_are_clear_errors():
    with pytest.raises(ModelError, match=r"unknown model 'resnet19'.*package.module:factory"):
        build_model(ModelSpec(name="resnet19"), seed=0)
    with pytest.raises(ModelError, match=r"cannot import 'no_such_pkg.models'"):
        build_model(ModelSpec(name="no_such_pkg.models:net"), seed=0)
    with pytest.raises(ModelError, match=r"has no 'missing'"):
        build_model(ModelSpec(name=f"{USER}:missing"), seed=0)
    with pytest.raises(ModelError, match=r"failed: RuntimeError: the checkpoint server is down"):
        build_model(ModelSpec(name=f"{USER}:broken"), seed=0)
    with pytest.raises(ModelError, match=r"returned str, not an nn.Module"):
        build_model(ModelSpec(name=f"{USER}:not_a_model"), seed=0)
    with pytest.raises(ModelError, match=r"failed: TypeError"):
        build_model(ModelSpec(name=f"{USER}:small_cnn", kwargs={"depth": 3}), seed=0)


def test_a_users_factory_with_kwargs_from_the_command_line(tmp_path, data_root):
    out = tmp_path / "user.zarr"
    result = CliRunner().invoke(
        cli,
        ["compute", "--model", f"{USER}:small_cnn", "--model-kwargs", '{"width": 6}',
         "--data-root", str(data_root), "--limit", "600", "--out", str(out), "-q"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output + result.stderr
    assert "solving 3 layer(s) in forward order: 0, 2, 6" in result.stderr
    g = zarr.open_group(str(out), mode="r")
    assert g.attrs["config"]["model_kwargs"] == {"width": 6}
    assert g["final/0.weight"].shape == (6, 1, 3, 3)
    for name in ("0", "2", "6"):
        mean, std = pooled(g, "verify/train", name)
        assert abs(mean) < 1e-4 and abs(std - 1) < 1e-4, name


@pytest.mark.parametrize(
    "args,message",
    [
        (["--model", f"{USER}:broken"], "the checkpoint server is down"),
        (["--model", f"{USER}:no_layers"], "has no conv or linear layer"),
        (["--model", "resnet19"], "unknown model 'resnet19'"),
        (["--model-kwargs", "{width: 6}"], "--model-kwargs"),
        (["--model-kwargs", "[1, 2]"], "must be a JSON object"),
        (["--include", "conv9"], "--include 'conv9' matches no conv / linear layer"),
        (["--include", "conv("], "--include 'conv(' is not a regular expression"),
        (["--exclude", "."], "leave no layer to solve"),
    ],
)
def test_model_and_selection_mistakes_are_one_line_errors(tmp_path, data_root, args, message):
    result = CliRunner().invoke(
        cli, ["compute", "--data-root", str(data_root), "--limit", "300", "--out",
              str(tmp_path / "r.zarr"), "-q", *args],
    )  # fmt: skip
    assert result.exit_code in (1, 2)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: ") and message in lines[0], result.stderr


def test_an_input_the_model_rejects_is_a_clear_error(tmp_path, data_root):
    result = CliRunner().invoke(
        cli, ["compute", "--model", "vgg11_bn", "--data-root", str(data_root), "--limit", "64",
              "--out", str(tmp_path / "r.zarr"), "-q"],
    )  # fmt: skip
    assert result.exit_code == 1
    assert "VGG failed on an input batch of shape (2, 1, 28, 28)" in result.stderr


def test_include_and_exclude_select_the_expected_layers():
    model = build_model(ModelSpec(name="resnet18"), seed=0, in_channels=1, num_classes=10)
    layers = trace(model, torch.randn(2, 1, 28, 28))
    names = lambda chosen: [i.name for i in chosen]  # noqa: E731
    assert names(select(layers, include=[r"^layer4\."])) == [
        "layer4.0.conv1", "layer4.0.conv2", "layer4.0.downsample.0", "layer4.1.conv1",
        "layer4.1.conv2",
    ]  # fmt: skip
    assert names(select(layers, include=["downsample", "^fc$"])) == [
        "layer2.0.downsample.0", "layer3.0.downsample.0", "layer4.0.downsample.0", "fc",
    ]  # fmt: skip
    chosen = select(layers, exclude=[r"^layer[1-3]\.", "downsample"])
    assert names(chosen) == ["conv1", "layer4.0.conv1", "layer4.0.conv2", "layer4.1.conv1",
                             "layer4.1.conv2", "fc"]  # fmt: skip
    with pytest.raises(ConfigError, match="matches no conv / linear layer"):
        select(layers, include=["layer5"])


def test_only_selected_layers_are_solved_and_the_rest_keep_their_weights(tmp_path, data_root):
    out = tmp_path / "sel.zarr"
    cfg = RunConfig(limit=600, shard_size=300, include=("conv[24]",), holdout=None)
    result = compute(cfg, out, data_root=data_root, device="cpu")
    assert [s.name for s in result.layers] == ["conv2", "conv4"]
    g = zarr.open_group(str(out), mode="r")
    assert sorted(g["layers"].group_keys()) == ["conv2", "conv4"]
    for kept in ("conv1.weight", "conv3.weight", "l1.bias"):
        assert np.array_equal(g[f"initial/{kept}"][...], g[f"final/{kept}"][...])
    assert not np.array_equal(g["initial/conv4.weight"][...], g["final/conv4.weight"][...])
    mean, std = pooled(g, "verify/train", "conv4")
    assert abs(mean) < 1e-4 and abs(std - 1) < 1e-4
    assert "conv3" not in g["verify/train"]  # only the chosen layers are measured
    assert open_run(out).config.include == ("conv[24]",)


def test_show_draws_the_plot(tmp_path):
    png = tmp_path / "stats.png"
    result = CliRunner().invoke(cli, ["show", "mnist-mj", "--plot", str(png)])
    assert result.exit_code == 0, result.output
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
