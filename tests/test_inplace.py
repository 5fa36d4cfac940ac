"""lsuv_: one call from a training script, on its own shuffling loader, writing nothing."""

import os
import tempfile

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

import lsuv_pipeline
from lsuv_pipeline import RunConfig, compute, open_run
from lsuv_pipeline.errors import ConfigError, DataError


def small_cnn():
    return nn.Sequential(
        nn.Conv2d(1, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10),
    )  # fmt: skip


def same_weights(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def _data(n=300):
    g = torch.Generator().manual_seed(0)
    return TensorDataset(torch.randn(n, 1, 12, 12, generator=g) * 3 + 1, torch.arange(n) % 10)


def test_a_shuffling_loader_gives_the_init_of_its_data_in_order_and_moves_no_rng(
    tmp_path, monkeypatch
):
    monkeypatch.chdir(tmp_path)
    data = _data()
    loader = DataLoader(data, batch_size=64, shuffle=True, generator=torch.Generator())
    loader.generator.manual_seed(5)
    generator_state = loader.generator.get_state()
    torch.manual_seed(1)
    model = small_cnn()
    global_state = torch.get_rng_state()
    returned = lsuv_pipeline.lsuv_(model, loader, progress=False)
    assert returned is model
    assert torch.equal(torch.get_rng_state(), global_state)
    assert torch.equal(loader.generator.get_state(), generator_state)
    assert os.listdir(tmp_path) == []  # nothing written
    torch.manual_seed(1)
    ordered = compute(RunConfig(dataset="data", holdout=None), tmp_path / "o.zarr",
                      model=small_cnn(), data=DataLoader(data, batch_size=64),
                      device="cpu").model  # fmt: skip
    assert same_weights(model, ordered)
    x = torch.stack([data[i][0] for i in range(len(data))])
    with torch.no_grad():
        y = model[:3](x)
    assert abs(y.mean().item()) < 1e-5 and abs(y.std(correction=0).item() - 1) < 1e-5


def test_a_store_makes_it_resumable_and_up_to_date(tmp_path):
    torch.manual_seed(2)
    model = small_cnn()
    out = tmp_path / "init.zarr"
    lsuv_pipeline.lsuv_(model, _data(), store=out, verify=True, progress=False)
    run = open_run(out)
    assert run.status == "complete" and [i.name for i in run.layers] == ["0", "2", "6"]
    torch.manual_seed(2)
    again = lsuv_pipeline.lsuv_(small_cnn(), _data(), store=out, verify=True, progress=False)
    assert same_weights(model, again)


class Augmented(Dataset):
    """A random flip and noise in __getitem__: every read is another sample."""

    def __init__(self, x):
        self.x = x

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return self.x[i] + 0.1 * torch.randn_like(self.x[i])


@pytest.mark.parametrize("as_loader", [False, True])
def test_data_that_changes_between_passes_is_an_error_that_says_so(tmp_path, as_loader):
    data = Augmented(torch.randn(128, 1, 12, 12))
    data = DataLoader(data, batch_size=32) if as_loader else data
    with pytest.raises(DataError, match=r"changes between passes \(a random augmentation"):
        lsuv_pipeline.lsuv_(small_cnn(), data, progress=False)


def test_not_a_module_is_one_line():
    with pytest.raises(ConfigError, match=r"lsuv_ takes a torch.nn.Module, got str"):
        lsuv_pipeline.lsuv_("resnet18", _data())


def test_a_temporary_directory_that_cannot_be_written_is_one_store_error(tmp_path, monkeypatch):
    from lsuv_pipeline.errors import StoreError

    blocked = tmp_path / "not-a-folder"
    blocked.write_text("")
    monkeypatch.setattr(tempfile, "tempdir", str(blocked))  # as TMPDIR=<a file> would
    with pytest.raises(StoreError, match=r"cannot create a temporary folder in .*TMPDIR"):
        lsuv_pipeline.lsuv_(small_cnn(), _data(), progress=False)
