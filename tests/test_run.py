import numpy as np
import pytest
import torch
import zarr
from click.testing import CliRunner
from torch import nn
from torch.nn import functional as F

from lsuv_pipeline import RunConfig, compute, load_init, verify
from lsuv_pipeline import moments as mom
from lsuv_pipeline.cli import cli
from lsuv_pipeline.data import DatasetSpec, open_source
from lsuv_pipeline.errors import DataError, LayerError, ModelError, OffTarget, StoreError
from lsuv_pipeline.models import mj, unwrap
from lsuv_pipeline.progress import Progress

SMALL = dict(limit=1500, shard_size=512, batch_size=128)


def check_layers(model, x, names, tol):
    """Independent check: float64 copy of the model, hooks written here."""
    model = model.double().eval()
    seen = {}
    hooks = [
        model.get_submodule(n).register_forward_hook(
            lambda m, i, o, n=n: seen.setdefault(n, []).append(o.detach().clone())
        )
        for n in names
    ]
    with torch.no_grad():
        model(x.double())
    for h in hooks:
        h.remove()
    for n in names:
        y = torch.cat([t.flatten() for t in seen[n]])
        assert abs(y.mean().item()) <= tol, n
        assert abs(y.std(correction=0).item() - 1) <= tol, n


def all_samples(data_root, limit, split="train"):
    src = open_source(DatasetSpec(name="mnist", split=split, root=str(data_root), limit=limit))
    return src.batch(0, src.count)


def test_compute_writes_the_whole_store_and_solves_every_layer(tmp_path, data_root):
    out = tmp_path / "run.zarr"
    model = mj()
    model.train()
    result = compute(RunConfig(**SMALL), out, model=model, data_root=data_root, device="cpu")
    assert model.training  # its own mode is restored
    names = ["conv1", "conv2", "conv3", "conv4", "l1"]
    assert [s.name for s in result.layers] == names
    assert result.passes == 5

    g = zarr.open_group(str(out), mode="r")
    attrs = dict(g.attrs)
    assert attrs["status"] == "complete" and attrs["schema"] == 1
    assert [layer["name"] for layer in attrs["layers"]] == names
    assert attrs["dataset"]["count"] == 1500 and attrs["dataset"]["fingerprint"].startswith(
        "sha256:"
    )
    assert attrs["config"]["mode"] == "tensor" and "torch" in attrs["versions"]
    for section in ("initial", "final"):
        assert set(g[section].array_keys()) == set(model.state_dict())
    for name in names:
        for key in ("count", "mean", "var", "scale", "shift"):
            assert key in g[f"layers/{name}"]
        assert g[f"layers/{name}"].attrs["committed"] is True
        for split in ("verify/train", "verify/test", "before/train"):
            assert g[f"{split}/{name}/var"].shape == (model.get_submodule(name).weight.shape[0],)
    assert g["layers/conv1/count"][0] == 1500 * 13 * 13

    # the final weights are the model's, and they solve every layer on the data
    for k, v in model.state_dict().items():
        assert np.array_equal(g[f"final/{k}"][...], v.numpy())
    fresh = mj()
    fresh.load_state_dict({k: torch.from_numpy(g[f"final/{k}"][...]) for k in model.state_dict()})
    check_layers(fresh, all_samples(data_root, 1500), names, 1e-4)


def test_the_same_run_twice_gives_the_same_bytes(tmp_path, data_root):
    cfg = RunConfig(**SMALL, verify=False)
    a = compute(cfg, tmp_path / "a.zarr", data_root=data_root, device="cpu").model
    b = compute(cfg, tmp_path / "b.zarr", data_root=data_root, device="cpu").model
    for (k, va), vb in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(va, vb), k


def test_channel_mode_gives_each_channel_unit_std(tmp_path, data_root):
    cfg = RunConfig(**SMALL, mode="channel", holdout=None)
    result = compute(cfg, tmp_path / "c.zarr", data_root=data_root, device="cpu")
    g = zarr.open_group(str(tmp_path / "c.zarr"), mode="r")
    assert g["layers/conv2/scale"].shape == (16,)
    for name in ("conv1", "conv2", "conv3", "conv4", "l1"):
        var = g[f"verify/train/{name}/var"][...]
        mean = g[f"verify/train/{name}/mean"][...]
        assert np.abs(np.sqrt(var) - 1).max() < 1e-4 and np.abs(mean).max() < 1e-4, name
    assert "verify/test" not in g
    assert result.model.conv1.weight.dtype == torch.float32


def test_orthogonal_pre_init_is_seeded(tmp_path, data_root):
    runs = [
        compute(
            RunConfig(**SMALL, orthogonal=True, seed=seed, verify=False),
            tmp_path / f"o{i}.zarr",
            data_root=data_root,
            device="cpu",
        )
        for i, seed in enumerate([1, 1, 2])
    ]
    initial = [
        zarr.open_group(str(tmp_path / f"o{i}.zarr"))["initial/conv2.weight"][...] for i in range(3)
    ]
    assert np.array_equal(initial[0], initial[1]) and not np.array_equal(initial[0], initial[2])
    w = initial[0].reshape(16, -1)
    assert np.allclose(w @ w.T, np.eye(16), atol=1e-5)
    assert runs[0].passes == 5


class Twice(nn.Module):
    """A conv applied twice in a row, and a bias-free head."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(1, 8, 3, padding=1)
        self.shared = nn.Conv2d(8, 8, 3, padding=1)
        self.head = nn.Linear(8, 10, bias=False)

    def forward(self, x):
        x = F.relu(self.stem(x))
        x = F.relu(self.shared(x))
        x = F.relu(self.shared(x))
        return self.head(x.mean((2, 3)))


@pytest.mark.parametrize("mode", ["tensor", "channel"])
def test_shared_layer_whose_calls_feed_each_other_is_iterated_to_tol(tmp_path, data_root, mode):
    torch.manual_seed(0)
    model = Twice()
    cfg = RunConfig(**SMALL, mode=mode, holdout=None)
    result = compute(cfg, tmp_path / "t.zarr", model=model, data_root=data_root, device="cpu")
    stats = {s.name: s for s in result.layers}
    assert 2 < stats["shared"].passes <= 12 and stats["shared"].converged
    assert stats["stem"].passes == 1 and stats["head"].passes == 1
    g = zarr.open_group(str(tmp_path / "t.zarr"), mode="r")
    assert g["layers/shared"].attrs["passes"] == stats["shared"].passes
    assert g["layers/shared"].attrs["residual_std"] <= 1e-4
    n = int(g["verify/train/shared/count"][0])
    pooled = mom.Moments(
        count=n,
        mean=torch.from_numpy(g["verify/train/shared/mean"][...]),
        m2=torch.from_numpy(g["verify/train/shared/var"][...]) * n,
    )
    view = mom.reduce_channels(pooled) if mode == "tensor" else pooled
    assert view.mean.abs().max() <= 1e-4 and (view.std - 1).abs().max() <= 1e-4
    # the head has no bias: its std is solved, its mean is recorded, not hidden
    assert g["layers/head"].attrs["has_bias"] is False
    head = mom.reduce_channels(
        mom.Moments(
            count=int(g["verify/train/head/count"][0]),
            mean=torch.from_numpy(g["verify/train/head/mean"][...]),
            m2=torch.from_numpy(g["verify/train/head/var"][...])
            * int(g["verify/train/head/count"][0]),
        )
    )
    if mode == "tensor":
        assert abs(head.std.item() - 1) <= 1e-4
    assert abs(head.mean.item()) > 1e-3
    assert "no bias" in result.table()


def test_an_unconverged_layer_fails_the_run_and_is_flagged_in_the_table(tmp_path, data_root):
    torch.manual_seed(0)
    cfg = RunConfig(**SMALL, max_iter=2, holdout=None)
    with pytest.raises(OffTarget, match=r"miss the tolerance 0.0001 on 'train'.*shared") as info:
        compute(cfg, tmp_path / "u.zarr", model=Twice(), data_root=data_root, device="cpu")
    result = info.value.result
    assert result.off_target == ["shared"]
    shared = next(s for s in result.layers if s.name == "shared")
    assert not shared.converged and shared.passes == 2
    assert "NOT CONVERGED" in result.table() and "train OFF TARGET" in result.table()
    g = zarr.open_group(str(tmp_path / "u.zarr"))
    assert g["layers/shared"].attrs["converged"] is False
    assert g.attrs["status"] == "complete"
    assert g.attrs["verification"]["off_target"] == ["shared"]
    with pytest.raises(StoreError, match=r"off target \(shared\); pass allow_off_target=True"):
        load_init(Twice(), tmp_path / "u.zarr")
    load_init(Twice(), tmp_path / "u.zarr", allow_off_target=True)
    torch.manual_seed(0)
    with pytest.raises(OffTarget):  # a rerun is up to date, and still says so
        compute(cfg, tmp_path / "u.zarr", model=Twice(), data_root=data_root, device="cpu")


class TwiceNoBias(nn.Module):
    """A bias-free conv applied twice in a row: judged on its std only."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(1, 8, 3, padding=1)
        self.shared = nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.head = nn.Linear(8, 10)

    def forward(self, x):
        x = F.relu(self.stem(x))
        x = self.shared(F.relu(self.shared(x)))
        return self.head(F.relu(x).mean((2, 3)))


def test_a_bias_free_layer_applied_twice_converges_on_its_std(tmp_path, data_root):
    torch.manual_seed(0)
    cfg = RunConfig(**SMALL, holdout=None)
    result = compute(cfg, tmp_path / "nb.zarr", model=TwiceNoBias(), data_root=data_root,
                     device="cpu")  # fmt: skip
    shared = next(s for s in result.layers if s.name == "shared")
    assert shared.converged and shared.passes < cfg.max_iter
    attrs = zarr.open_group(str(tmp_path / "nb.zarr"))["layers/shared"].attrs
    assert attrs["residual_std"] <= result.config.tol and attrs["residual_mean"] > result.config.tol


class DeadSecond(nn.Module):
    def __init__(self):
        super().__init__()
        self.first = nn.Conv2d(1, 4, 3)
        self.second = nn.Conv2d(4, 4, 3)

    def forward(self, x):
        return self.second(self.first(x) * 0)  # second sees constant input: zero variance


def test_dead_layer_stops_the_run_naming_it_and_keeps_what_was_solved(tmp_path, data_root):
    out = tmp_path / "dead.zarr"
    with pytest.raises(LayerError, match=r"layer 'second': its whole output is constant"):
        compute(RunConfig(**SMALL), out, model=DeadSecond(), data_root=data_root, device="cpu")
    g = zarr.open_group(str(out), mode="r")
    assert g.attrs["status"] == "running"
    assert g["layers/first"].attrs["committed"] is True
    assert "second" not in g["layers"]
    assert "initial" in g


def test_out_that_is_not_a_run_store_is_refused(tmp_path, data_root):
    cfg = RunConfig(limit=300, shard_size=300, verify=False)
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.txt").write_text("keep me")
    with pytest.raises(StoreError, match=r"not a run store"):
        compute(cfg, tmp_path / "notes", data_root=data_root, device="cpu", overwrite=True)
    assert (tmp_path / "notes" / "todo.txt").exists()
    zarr.open_group(str(tmp_path / "other.zarr"), mode="w").attrs["x"] = 1
    with pytest.raises(StoreError, match=r"Zarr group but not a run store"):
        compute(cfg, tmp_path / "other.zarr", data_root=data_root, device="cpu", overwrite=True)


def rng_states():
    import random

    return torch.get_rng_state(), np.random.get_state()[1].copy(), random.getstate()


def assert_same_rng(a, b):
    assert torch.equal(a[0], b[0]), "torch's global RNG moved"
    assert np.array_equal(a[1], b[1]), "NumPy's global RNG moved"
    assert a[2] == b[2], "Python's global RNG moved"


def test_compute_leaves_the_callers_random_state_as_it_found_it(tmp_path, data_root):
    from torch.utils.data import DataLoader

    x = all_samples(data_root, 600)
    loader = DataLoader(torch.utils.data.TensorDataset(x), batch_size=100)  # draws a seed per pass
    out = tmp_path / "rng.zarr"
    cfg = RunConfig(shard_size=300, batch_size=100)
    first, second = mj(), mj()
    second.load_state_dict(first.state_dict())
    before = rng_states()
    compute(cfg, out, model=first, data=loader, holdout_data=loader, device="cpu")
    assert_same_rng(before, rng_states())
    again = compute(cfg, out, model=second, data=loader, holdout_data=loader, device="cpu")
    assert again.up_to_date
    assert_same_rng(before, rng_states())


# -- weights the solve cannot simply divide -------------------------------------------


def parametrized_cnn(kind):
    """mj-like CNN whose middle conv and head carry a weight parametrization or a tie."""
    from torch.nn.utils import parametrizations as P

    torch.manual_seed(0)
    c1, c2, head = nn.Conv2d(1, 8, 3, stride=2), nn.Conv2d(8, 16, 3), nn.Linear(16, 10)
    if kind == "weight_norm":
        c2, head = P.weight_norm(c2), P.weight_norm(head)
    elif kind == "weight_norm_channel_dim":
        c2 = P.weight_norm(c2, dim=0)
    elif kind == "old_weight_norm":
        with pytest.warns(FutureWarning):
            c2, head = nn.utils.weight_norm(c2), nn.utils.weight_norm(head)
    elif kind == "spectral_norm":
        c2 = P.spectral_norm(c2)
    return nn.Sequential(c1, nn.ReLU(), c2, nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), head)


@pytest.mark.parametrize("kind", ["weight_norm", "old_weight_norm"])
@pytest.mark.parametrize("mode", ["tensor", "channel"])
def test_weight_norm_layers_are_solved_through_their_magnitude(tmp_path, data_root, kind, mode):
    model = parametrized_cnn(kind)
    cfg = RunConfig(**SMALL, mode=mode, holdout=None)
    result = compute(cfg, tmp_path / "wn.zarr", model=model, data_root=data_root, device="cpu")
    assert [s.name for s in result.solved] == ["0", "2", "6"]
    assert not model[2].weight.is_inference()  # usable outside inference mode
    x = all_samples(data_root, SMALL["limit"])
    check_layers(model, x, ["0", "2", "6"], 1e-4)  # the effective weights, from scratch


class Shared(nn.Module):
    """Two linear layers sharing one weight (separate biases), then a head."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(1, 8, 5, stride=3)
        self.a = nn.Linear(8, 8)
        self.b = nn.Linear(8, 8)
        self.b.weight = self.a.weight
        self.head = nn.Linear(8, 10)

    def forward(self, x):
        h = F.relu(self.stem(x)).mean((2, 3))
        return self.head(F.relu(self.b(F.relu(self.a(h)))))


class TiedToProjection(nn.Module):
    """A head that shares its weight with a non-target module used before it."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(1, 8, 5, stride=3)
        self.proj = nn.Module()
        self.proj.weight = nn.Parameter(torch.randn(8, 8) / 3)
        self.head = nn.Linear(8, 8)
        self.head.weight = self.proj.weight

    def forward(self, x):
        h = F.relu(self.stem(x)).mean((2, 3))
        return self.head(F.relu(h @ self.proj.weight.T))


def test_spectral_norm_is_left_as_it_is_and_named(tmp_path, data_root):
    model = parametrized_cnn("spectral_norm")
    cfg = RunConfig(**SMALL, holdout=None)
    result = compute(cfg, tmp_path / "sn.zarr", model=model, data_root=data_root, device="cpu")
    row = next(s for s in result.layers if s.name == "2")
    assert row.reason.startswith("its weight is computed by the parametrization SpectralNorm")
    assert [s.name for s in result.solved] == ["0", "6"]
    assert "not solved: its weight is computed by the parametrization SpectralNorm" in (
        result.table()
    )
    unsolved = zarr.open_group(str(tmp_path / "sn.zarr")).attrs["unsolved"]
    assert [u["name"] for u in unsolved] == ["2"]
    check_layers(model, all_samples(data_root, SMALL["limit"]), ["0", "6"], 1e-4)


def test_weight_norm_of_another_dim_in_channel_mode_is_named(tmp_path, data_root):
    from torch.nn.utils import parametrizations as P

    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 4, 3), nn.Flatten(), P.weight_norm(nn.Linear(2704, 6), dim=1)
    )
    cfg = RunConfig(**SMALL, mode="channel", holdout=None)
    result = compute(cfg, tmp_path / "d1.zarr", model=model, data_root=data_root, device="cpu")
    assert "channel mode needs weight norm over the output channels" in result.layers[1].reason


@pytest.mark.parametrize("mode", ["tensor", "channel"])
def test_tied_layers_are_solved_at_the_first_use_and_the_later_named(tmp_path, data_root, mode):
    torch.manual_seed(0)
    model = Shared()
    cfg = RunConfig(**SMALL, mode=mode, holdout=None)
    result = compute(cfg, tmp_path / "t.zarr", model=model, data_root=data_root, device="cpu")
    assert [s.name for s in result.solved] == ["stem", "a", "head"]
    b = next(s for s in result.layers if s.name == "b")
    assert b.reason == "tied to 'a' (its weight; solved there)"
    assert model.a.weight is model.b.weight  # still tied
    check_layers(model, all_samples(data_root, SMALL["limit"]), ["stem", "a", "head"], 1e-4)


def test_a_head_tied_to_a_module_before_it_is_left_and_named(tmp_path, data_root):
    torch.manual_seed(0)
    model = TiedToProjection()
    before = model.head.weight.detach().clone()
    cfg = RunConfig(**SMALL, holdout=None)
    result = compute(cfg, tmp_path / "e.zarr", model=model, data_root=data_root, device="cpu")
    head = next(s for s in result.layers if s.name == "head")
    assert (
        head.reason == "weight tied to 'proj' (Module): rescaling it would change that module too"
    )
    assert torch.equal(model.head.weight, before)
    check_layers(model, all_samples(data_root, SMALL["limit"]), ["stem"], 1e-4)


class HiddenUse(nn.Module):
    """``b``'s input uses ``a``'s weight through F.linear: invisible to the hooks, so the
    solve of ``a`` changes what ``b`` sees after the fact."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(1, 8, 5, stride=3)
        self.a = nn.Linear(8, 8)
        self.b = nn.Linear(8, 10)

    def forward(self, x):
        h = F.relu(self.stem(x)).mean((2, 3))
        h = F.relu(self.a(h))
        return self.b(F.linear(h, self.a.weight))


def test_a_layer_off_target_after_the_solve_fails_the_run(tmp_path, data_root):
    torch.manual_seed(0)
    out = tmp_path / "h.zarr"
    cfg = RunConfig(**SMALL, holdout=None)
    with pytest.raises(OffTarget, match=r"1 solved layer\(s\) miss the tolerance .* b ") as info:
        compute(cfg, out, model=HiddenUse(), data_root=data_root, device="cpu")
    assert info.value.result.off_target == ["b"]
    result = CliRunner().invoke(cli, ["show", str(out)])
    assert "train OFF TARGET by > 0.0001" in result.output


def test_nan_in_the_held_out_data_is_an_error_naming_the_split_and_samples(tmp_path, data_root):
    x = all_samples(data_root, 1200)
    test = x.clone()
    test[500, 0, 3, 3] = float("nan")
    cfg = RunConfig(shard_size=400, batch_size=200, dataset="mine")
    with pytest.raises(DataError, match=r"split 'test' of 'mine', samples 400..799: layer "
                       r"'conv1' gives NaN or infinite outputs"):  # fmt: skip
        compute(cfg, tmp_path / "n.zarr", model=mj(), data=torch.utils.data.TensorDataset(x),
                holdout_data=torch.utils.data.TensorDataset(test), device="cpu")  # fmt: skip
    x[900, 0, 0, 0] = float("inf")
    with pytest.raises(DataError, match=r"split 'train' of 'mine', samples 800..1199"):
        compute(cfg, tmp_path / "t.zarr", model=mj(), data=torch.utils.data.TensorDataset(x),
                device="cpu")  # fmt: skip


@pytest.mark.parametrize("model", ["mj", nn.Conv2d, 3])
def test_a_model_that_is_not_a_module_is_a_model_error(tmp_path, data_root, model):
    with pytest.raises(ModelError, match=r"must be a torch.nn.Module, got"):
        compute(RunConfig(**SMALL), tmp_path / "m.zarr", model=model, data_root=data_root)
    assert not (tmp_path / "m.zarr").exists()


# -- dead channels and zero-initialized layers ----------------------------------------


class DeadChannel(nn.Module):
    """A depthwise conv fed by a ReLU channel that is 0 on every sample (as in mobilenets)."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(1, 4, 3)
        self.dw = nn.Conv2d(4, 4, 3, groups=4)
        self.head = nn.Linear(4, 10)
        with torch.no_grad():
            self.stem.weight[1] = 0
            self.stem.bias[1] = -1.0  # channel 1 is -1 everywhere, ReLU makes it 0

    def forward(self, x):
        x = self.dw(torch.relu(self.stem(x)))  # dw's channel 1 is its bias: constant
        return self.head(torch.relu(x).mean((2, 3)))


@pytest.mark.parametrize("mode", ["tensor", "channel"])
def test_dead_channels_are_solved_around_and_reported(tmp_path, data_root, mode):
    cfg = RunConfig(**{**SMALL, "mode": mode})
    notes = []

    class Notes(Progress):
        def note(self, text):
            notes.append(text)

    result = compute(cfg, tmp_path / "d.zarr", model=DeadChannel(), data_root=data_root,
                     device="cpu", progress=Notes())  # fmt: skip
    rows = {r.name: r for r in result.layers}
    assert rows["stem"].dead == 1 and rows["dw"].dead == 1 and rows["head"].dead == 0
    assert any("'dw': 1 of 4 output channel(s) are constant" in n for n in notes), notes
    assert "1 dead channel(s)" in result.table() and "OFF TARGET" not in result.table()
    attrs = zarr.open_group(str(tmp_path / "d.zarr"), mode="r")["layers/dw"].attrs
    assert attrs["dead_channels"] == [1]
    m = mom.reduce_channels(rows["dw"].after["train"])
    assert abs(m.std.item() - 1) < 1e-4 or mode == "channel"
    live = rows["dw"].after["train"]
    keep = torch.tensor([0, 2, 3])
    assert (live.std[keep] - 1).abs().max() < 1e-4 or mode == "tensor"


class ZeroHead(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3)
        self.head = nn.Linear(4, 10)
        nn.init.zeros_(self.head.weight)  # as torchvision's ViT does for heads.head

    def forward(self, x):
        return self.head(torch.relu(self.conv(x)).mean((2, 3)))


def test_a_zero_initialized_layer_is_named_before_the_first_pass(tmp_path, data_root):
    notes = []

    class Notes(Progress):
        def pass_started(self, label, total):
            notes.append(f"pass {label}")

        def note(self, text):
            notes.append(text)

    result = compute(RunConfig(**SMALL), tmp_path / "z.zarr", model=ZeroHead(),
                     data_root=data_root, device="cpu", progress=Notes())  # fmt: skip
    assert [s.name for s in result.solved] == ["conv"]
    listing = next(i for i, n in enumerate(notes) if n.startswith("solving"))
    first_pass = next(i for i, n in enumerate(notes) if n.startswith("pass"))
    assert (
        listing < first_pass and "'head' (Linear): its weight is all zero at init" in notes[listing]
    )
    assert "not solved: its weight is all zero" in result.table()
    unsolved = zarr.open_group(str(tmp_path / "z.zarr"), mode="r").attrs["unsolved"]
    assert [u["name"] for u in unsolved] == ["head"]
    again = compute(RunConfig(**{**SMALL, "orthogonal": True}), tmp_path / "o.zarr",
                    model=ZeroHead(), data_root=data_root, device="cpu")  # fmt: skip
    assert [s.name for s in again.solved] == ["conv", "head"]


class Versioned(nn.Module):
    """Checks the state-dict version when loaded, as torchvision's MNASNet does."""

    _version = 2

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3)
        self.head = nn.Linear(4, 10)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, *args, **kwargs):
        if local_metadata.get("version") != 2:
            raise ValueError(f"version should be 2, not {local_metadata.get('version')}")
        super()._load_from_state_dict(state_dict, prefix, local_metadata, *args, **kwargs)

    def forward(self, x):
        return self.head(torch.relu(self.conv(x)).mean((2, 3)))


def test_a_model_that_checks_its_state_dict_version_is_solved_and_resumed(tmp_path, data_root):
    out = tmp_path / "v.zarr"

    def model():
        torch.manual_seed(0)
        return Versioned()

    result = compute(RunConfig(**SMALL), out, model=model(), data_root=data_root, device="cpu")
    assert [s.name for s in result.solved] == ["conv", "head"]
    again = compute(RunConfig(**SMALL), out, model=model(), data_root=data_root, device="cpu")
    assert again.up_to_date  # the stored init loaded into a fresh model


def small_cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 8, 3), nn.ReLU(), nn.Conv2d(8, 16, 3, stride=2), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10),
    )  # fmt: skip


@pytest.mark.parametrize(
    "dtype,tol,cache",
    [(torch.bfloat16, 1e-2, True), (torch.bfloat16, 1e-2, False), (torch.float16, 1e-3, True)],
)
def test_a_half_precision_model_runs_in_its_dtype_and_is_judged_at_its_precision(
    tmp_path, data_root, dtype, tol, cache
):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = small_cnn().to(dtype)
    out = tmp_path / "half.zarr"
    cfg = RunConfig(limit=512, shard_size=256, batch_size=128, holdout=None)
    result = compute(cfg, out, model=model, data_root=data_root, device="cpu", cache=cache)
    assert result.config.tol == tol  # the default widened for the dtype, and recorded
    assert zarr.open_group(str(out), mode="r").attrs["config"]["tol"] == tol
    assert all(t.dtype == dtype for t in model.state_dict().values())
    assert [s.name for s in result.solved] == ["0", "2", "6"]
    for s in result.solved:
        after = mom.reduce_channels(s.after["train"])
        assert abs(after.mean.item()) < tol and abs(after.std.item() - 1) < tol, s.name
    checked = verify(out, model=model, data_root=data_root, device="cpu")
    assert checked.ok and checked.tol == tol
    assert all(t.dtype == dtype for t in model.state_dict().values())


def test_a_float32_model_keeps_the_default_tolerance_and_an_explicit_one_is_kept(
    tmp_path, data_root
):
    cfg = RunConfig(limit=256, shard_size=256, holdout=None, verify=False)
    assert compute(cfg, tmp_path / "a.zarr", data_root=data_root, device="cpu").config.tol == 1e-4
    cfg = RunConfig(limit=256, shard_size=256, holdout=None, verify=False, tol=3e-3)
    half = small_cnn().to(torch.bfloat16)
    assert compute(cfg, tmp_path / "b.zarr", model=half, data_root=data_root,
                   device="cpu").config.tol == 3e-3  # fmt: skip


@pytest.mark.parametrize("wrap", ["DataParallel", "compile", "compiled DataParallel"])
def test_a_wrapped_model_is_solved_under_its_plain_names_and_the_wrapper_keeps_the_weights(
    tmp_path, data_root, wrap
):
    inner = mj()
    wrapped = {
        "DataParallel": lambda: nn.DataParallel(inner),  # on the CPU: calls the module
        "compile": lambda: torch.compile(inner),  # never run: the tool runs _orig_mod
        "compiled DataParallel": lambda: torch.compile(nn.DataParallel(inner)),
    }[wrap]()
    out = tmp_path / "wrapped.zarr"
    cfg = RunConfig(limit=512, shard_size=256, holdout=None)
    result = compute(cfg, out, model=wrapped, data_root=data_root, device="cpu")
    names = ["conv1", "conv2", "conv3", "conv4", "l1"]
    assert [s.name for s in result.solved] == names and result.model is inner
    g = zarr.open_group(str(out), mode="r")
    assert sorted(g["final"].array_keys()) == sorted(inner.state_dict())
    assert np.array_equal(g["final/conv1.weight"][...], inner.conv1.weight.detach().numpy())
    for loaded in (load_init(mj(), out), unwrap(load_init(nn.DataParallel(mj()), out))):
        assert all(torch.equal(v, inner.state_dict()[k]) for k, v in loaded.state_dict().items())
    # the wrapper shares the solved module: its own state has the new weights
    assert torch.equal(wrapped.state_dict()[next(iter(wrapped.state_dict()))],
                       inner.conv1.weight)  # fmt: skip
    assert verify(out, model=wrapped, data_root=data_root, device="cpu").ok
