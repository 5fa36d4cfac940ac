"""Models by name, a user's own factory, real datasets, layer selection, the plot."""

import itertools
import sys

import numpy as np
import pytest
import torch
import zarr
from click.testing import CliRunner
from torch import nn

from lsuv_pipeline import RunConfig, compute, load_init, open_run
from lsuv_pipeline import moments as mom
from lsuv_pipeline.cli import cli
from lsuv_pipeline.errors import ConfigError, ModelError, UnknownModel
from lsuv_pipeline.layers import select, trace
from lsuv_pipeline.models import ModelSpec, build_model, unwrap

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
        (["--model", "timm:resnet19"], "unknown timm model 'resnet19'"),
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
    assert [s.name for s in result.solved] == ["conv2", "conv4"]
    left = {s.name: s.reason for s in result.layers if s.reason}
    assert left == dict.fromkeys(["conv1", "conv3", "l1"], "left out by --include / --exclude")
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


def float64_stats(model, x, names):
    """Independent check: a float64 copy of the model, its own hooks, sums in float64."""
    model = model.double().eval()
    sums = {n: torch.zeros(3, dtype=torch.float64) for n in names}

    def hook(name):
        def f(module, inputs, out):
            sums[name] += torch.stack(
                [out.sum(), out.square().sum(), torch.tensor(out.numel(), dtype=torch.float64)]
            )

        return f

    handles = [model.get_submodule(n).register_forward_hook(hook(n)) for n in names]
    with torch.no_grad():
        for s in range(0, x.shape[0], 64):
            model(x[s : s + 64].double())
    for h in handles:
        h.remove()
    out = {}
    for n, (total, squares, count) in sums.items():
        mean = total / count
        out[n] = (mean.item(), (squares / count - mean.square()).sqrt().item())
    return out


@pytest.mark.parametrize(
    "name,options,limit",
    [("resnet18", {}, 512), ("vgg11_bn", {"resize": 32}, 256)],
)
def test_torchvision_models_on_fashion_mnist_get_unit_std_on_every_layer(
    tmp_path, data_root, name, options, limit
):
    from lsuv_pipeline.data import DatasetSpec, open_source

    cfg = RunConfig(
        dataset="fashion-mnist", dataset_options=options, model=name, limit=limit,
        shard_size=128, batch_size=64, holdout=None,
    )  # fmt: skip
    out = tmp_path / f"{name}.zarr"
    result = compute(cfg, out, data_root=data_root, device="cpu")
    run = open_run(out)
    assert len(run.layers) == {"resnet18": 21, "vgg11_bn": 11}[name]
    source = open_source(DatasetSpec(name="fashion-mnist", root=str(data_root), limit=limit,
                                     options=options))  # fmt: skip
    x = source.batch(0, source.count)
    fresh = build_model(ModelSpec(name=name), seed=1, in_channels=1, num_classes=10)
    load_init(fresh, out)
    stats = float64_stats(fresh, x, [i.name for i in run.layers])
    for s in result.layers:
        mean, std = stats[s.name]
        assert abs(std - 1) <= 1e-4, (s.name, std)
        if s.has_bias:
            assert abs(mean) <= 1e-4, (s.name, mean)
        else:  # no bias to absorb it: the mean is recorded, not hidden
            recorded = run.layer(s.name)["residual_mean"]
            assert abs(abs(mean) - recorded) <= 1e-5, (s.name, mean, recorded)


def test_imagefolder_of_pngs_from_the_command_line(tmp_path):
    from PIL import Image

    gen = torch.Generator().manual_seed(0)
    for c, cls in enumerate(["cat", "dog", "eel"]):
        (tmp_path / "pics" / cls).mkdir(parents=True)
        for i in range(6):
            size = (40 + 3 * i, 36 + 2 * c)
            pixels = torch.randint(0, 256, (size[1], size[0], 3), generator=gen, dtype=torch.uint8)
            Image.fromarray(pixels.numpy()).save(tmp_path / "pics" / cls / f"{i}.png")
    out = tmp_path / "folder.zarr"
    result = CliRunner().invoke(
        cli,
        ["compute", "--dataset", f"imagefolder:{tmp_path / 'pics'}", "--model", "resnet18",
         "--data-option", "resize=36", "--data-option", "crop=32",
         "--data-option", "normalize=compute", "--holdout", "none", "--batch-size", "6",
         "--data-root", str(tmp_path), "--out", str(out), "-q"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output + result.stderr
    g = zarr.open_group(str(out), mode="r")
    assert g.attrs["dataset"]["count"] == 18
    assert g.attrs["dataset"]["sample_shape"] == [3, 32, 32]
    assert g.attrs["dataset"]["num_classes"] == 3
    assert g["final/fc.weight"].shape == (3, 512)
    assert g.attrs["config"]["dataset_options"]["normalize"] == "compute"
    mean, std = pooled(g, "verify/train", "fc")
    assert abs(mean) < 1e-4 and abs(std - 1) < 1e-4


def test_a_users_own_data_through_the_api(tmp_path, data_root):
    from torch.utils.data import DataLoader, TensorDataset

    from lsuv_pipeline.data import DatasetSpec, open_source

    images = open_source(DatasetSpec(name="mnist", root=str(data_root), limit=600)).batch(0, 600)
    labels = torch.zeros(600, dtype=torch.long)
    held = open_source(DatasetSpec(name="mnist", split="test", root=str(data_root), limit=200))
    loaders = {
        "dataset": TensorDataset(images, labels),
        "loader": DataLoader(TensorDataset(images, labels), batch_size=100),
        "list": [images[i : i + 100] for i in range(0, 600, 100)],
    }
    finals = []
    for kind, data in loaders.items():
        out = tmp_path / f"{kind}.zarr"
        cfg = RunConfig(dataset=f"my-{kind}", shard_size=200, batch_size=100)
        result = compute(cfg, out, data=data, holdout_data=[held.batch(0, 200)],
                         data_root=data_root, device="cpu")  # fmt: skip
        g = zarr.open_group(str(out), mode="r")
        assert g.attrs["dataset"]["name"] == f"my-{kind}" and g.attrs["dataset"]["count"] == 600
        assert "verify/test/conv1" in g
        finals.append(result.model.state_dict())
    # the same samples in the same batches: the same init, whichever container held them
    for a, b in itertools.pairwise(finals):
        assert all(torch.equal(a[k], b[k]) for k in a)


def test_timm_models_by_name_are_built_for_the_data_and_seeded():
    pytest.importorskip("timm")
    a = build_model(ModelSpec(name="timm:test_resnet"), seed=3, in_channels=1, num_classes=7)
    b = build_model(ModelSpec(name="timm:test_resnet"), seed=3, in_channels=1, num_classes=7)
    assert a.conv1[0].in_channels == 1 and a.get_classifier().out_features == 7
    assert all(
        torch.equal(x, y)
        for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True)
    )
    assert a.eval()(torch.randn(2, 1, 28, 28)).shape == (2, 7)
    wide = build_model(ModelSpec(name="timm:test_resnet", kwargs={"drop_rate": 0.5}), seed=0)
    assert wide.drop_rate == 0.5  # --model-kwargs reach timm.create_model


def test_an_unknown_timm_name_and_a_missing_timm_are_one_line_errors(monkeypatch):
    pytest.importorskip("timm")
    with pytest.raises(UnknownModel, match=r"unknown timm model 'resnet19'.*timm.list_models"):
        build_model(ModelSpec(name="timm:resnet19"), seed=0)
    with pytest.raises(UnknownModel, match=r"--model 'timm:': expected timm:NAME"):
        build_model(ModelSpec(name="timm:"), seed=0)
    monkeypatch.setitem(sys.modules, "timm", None)  # import timm now raises ImportError
    with pytest.raises(ModelError, match=r"--model 'timm:resnet18' needs timm: pip install timm"):
        build_model(ModelSpec(name="timm:resnet18"), seed=0)


def test_a_timm_model_from_the_command_line_gets_unit_std_on_every_layer(tmp_path, data_root):
    pytest.importorskip("timm")
    out = tmp_path / "timm.zarr"
    result = CliRunner().invoke(
        cli,
        ["compute", "--model", "timm:test_resnet", "--data-root", str(data_root),
         "--limit", "256", "--shard-size", "128", "--batch-size", "64", "--holdout", "none",
         "--out", str(out), "-q"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output + result.stderr
    run = open_run(out)
    assert run.config.model == "timm:test_resnet" and len(run.layers) > 5
    g = zarr.open_group(str(out), mode="r")
    assert g["final/conv1.0.weight"].shape[1] == 1 and g["final/fc.weight"].shape[0] == 10
    for info in run.layers:
        mean, std = pooled(g, "verify/train", info.name)
        assert abs(std - 1) < 1e-4, (info.name, std)
        if run.layer(info.name)["has_bias"]:  # a bias-free conv (before its BN) keeps its mean
            assert abs(mean) < 1e-4, (info.name, mean)


def test_unwrap_takes_off_data_parallel_and_compile_wrappers_repeatedly():
    inner = nn.Linear(2, 2)
    assert unwrap(inner) is inner
    assert unwrap(nn.DataParallel(inner)) is inner
    assert unwrap(torch.compile(nn.DataParallel(nn.DataParallel(inner)))) is inner
    assert unwrap(nn.Sequential(inner)) is not inner  # a container is a model, not a wrapper
