import pytest
import torch
from torchvision import transforms
from torchvision.datasets import MNIST

from lsuv_pipeline.data import DatasetSpec, batches, open_source, resolve_root, shards
from lsuv_pipeline.errors import ConfigError, DataError


def test_mnist_batches_equal_torchvision_to_tensor_and_normalize(data_root):
    src = open_source(DatasetSpec(name="mnist", root=str(data_root), download=False))
    assert src.count == 60000 and src.sample_shape == (1, 28, 28) and src.num_classes == 10
    ref = MNIST(
        str(data_root),
        train=True,
        download=False,
        transform=transforms.Compose(
            [transforms.ToTensor(), transforms.Normalize((0.1307,), (0.3081,))]
        ),
    )
    got = src.batch(100, 108)
    want = torch.stack([ref[i][0] for i in range(100, 108)])
    assert torch.equal(got, want)


def test_test_split_and_fashion_mnist_open(data_root):
    test = open_source(DatasetSpec(name="mnist", split="test", root=str(data_root)))
    fashion = open_source(DatasetSpec(name="fashion-mnist", root=str(data_root)))
    assert test.count == 10000 and fashion.count == 60000
    assert len({test.fingerprint, fashion.fingerprint}) == 2


def test_fingerprint_follows_the_samples_and_the_limit(data_root):
    a = open_source(DatasetSpec(name="mnist", root=str(data_root), limit=500))
    b = open_source(DatasetSpec(name="mnist", root=str(data_root), limit=500))
    c = open_source(DatasetSpec(name="mnist", root=str(data_root), limit=501))
    assert a.count == 500 and a.fingerprint == b.fingerprint != c.fingerprint
    assert torch.equal(a.batch(490, 510), c.batch(490, 500))  # a limit cuts the range


def test_shards_are_contiguous_fixed_and_cover_everything():
    parts = shards(10, 4)
    assert [(s.start, s.stop) for s in parts] == [(0, 4), (4, 8), (8, 10)]
    assert [s.index for s in parts] == [0, 1, 2]
    assert batches(parts[1], 3) == [(4, 7), (7, 8)]
    with pytest.raises(ConfigError):
        shards(10, 0)


def test_unknown_dataset_missing_files_and_bad_split_are_clear_errors(tmp_path, data_root):
    with pytest.raises(DataError, match=r"unknown dataset 'mnits'.*mnist"):
        open_source(DatasetSpec(name="mnits", root=str(tmp_path)))
    with pytest.raises(DataError, match=r"not found under .*downloading is off"):
        open_source(DatasetSpec(name="mnist", root=str(tmp_path), download=False))
    with pytest.raises(ConfigError, match=r"'train' and 'test', not 'val'"):
        open_source(DatasetSpec(name="mnist", split="val", root=str(data_root)))


def test_failed_download_is_a_clear_error(tmp_path, monkeypatch):
    import torchvision.datasets.mnist as tvm

    def offline(*args, **kwargs):
        raise RuntimeError("Error downloading train-images-idx3-ubyte.gz: no network")

    monkeypatch.setattr(tvm.MNIST, "download", offline)
    with pytest.raises(DataError, match=r"download failed .*no network"):
        open_source(DatasetSpec(name="mnist", root=str(tmp_path), download=True))


def test_explicit_data_root_must_exist(tmp_path, monkeypatch):
    monkeypatch.delenv("LSUV_DATA_ROOT", raising=False)
    assert str(resolve_root(None)) == "data"
    with pytest.raises(DataError, match=r"from --data-root"):
        resolve_root(tmp_path / "nope")
    monkeypatch.setenv("LSUV_DATA_ROOT", str(tmp_path / "nope"))
    with pytest.raises(DataError, match=r"LSUV_DATA_ROOT"):
        resolve_root(None)
    assert resolve_root(tmp_path) == tmp_path
