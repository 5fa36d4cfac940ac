"""Sources beyond MNIST: CIFAR through torchvision, image folders, user data, limits, specs."""

from __future__ import annotations

import hashlib
import json
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, TensorDataset
from torchvision import datasets as tvd
from torchvision import transforms as T

from lsuv_pipeline.data import DatasetSpec, Shard, limited, open_source, shards, source_from
from lsuv_pipeline.errors import ConfigError, DataError

# The published training-split statistics, typed in independently of data.py.
CIFAR10_MEAN, CIFAR10_STD = (
    (0.49139968, 0.48215841, 0.44653091),
    (0.24703223, 0.24348513, 0.26158784),
)
CIFAR100_MEAN = (0.50707516, 0.48654887, 0.44091784)
CIFAR100_STD = (0.26733429, 0.25643846, 0.27615047)
IMAGENET = T.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


def normalized(images: np.ndarray, mean, std) -> torch.Tensor:
    """The reference: uint8 (N, C, H, W) -> ToTensor's x / 255, then Normalize."""
    return torch.stack(
        [T.Normalize(mean, std)(torch.from_numpy(im).float().div(255)) for im in images]
    )


def same_bytes(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and a.numpy().tobytes() == b.numpy().tobytes()


def all_batches(source, shard_size=7, batch_size=3) -> torch.Tensor:
    parts = [b for s in source.shards(shard_size) for b in source.batches(s, batch_size)]
    return torch.cat(parts)


# -- CIFAR in its original python-pickle format --------------------------------------


def _pickle(path: Path, obj) -> None:
    with open(path, "wb") as f:
        pickle.dump(obj, f)


def _md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def write_cifar(root: Path, cls, monkeypatch, *, train_sizes, test_size, seed=0):
    """Write CIFAR files the way the originals are laid out and trust their checksums.

    Returns the written images as uint8 ``(N, 3, 32, 32)`` arrays: ``(train, test)``. Only the
    md5 lists of torchvision's class are patched (for this test); its loading code is real.
    """
    rng = np.random.default_rng(seed)
    hundred = cls is tvd.CIFAR100
    folder = root / cls.base_folder
    folder.mkdir(parents=True)
    label_key = "fine_labels" if hundred else "labels"
    train_names = ["train"] if hundred else [f"data_batch_{i}" for i in range(1, 6)]
    test_name = "test" if hundred else "test_batch"
    written = {}
    for fname, size in [*zip(train_names, train_sizes, strict=True), (test_name, test_size)]:
        images = rng.integers(0, 256, size=(size, 3, 32, 32), dtype=np.uint8)
        written[fname] = images
        entry = {"data": images.reshape(size, 3072), label_key: list(range(size))}
        if hundred:
            entry["coarse_labels"] = [0] * size
        _pickle(folder / fname, entry)
    meta_name, meta_key = (
        ("meta", "fine_label_names") if hundred else ("batches.meta", "label_names")
    )
    _pickle(folder / meta_name, {meta_key: [f"class{i}" for i in range(100 if hundred else 10)]})
    monkeypatch.setattr(cls, "train_list", [[n, _md5(folder / n)] for n in train_names])
    monkeypatch.setattr(cls, "test_list", [[test_name, _md5(folder / test_name)]])
    monkeypatch.setattr(
        cls, "meta", {"filename": meta_name, "key": meta_key, "md5": _md5(folder / meta_name)}
    )
    train = np.concatenate([written[n] for n in train_names])
    return train, written[test_name]


def test_cifar10_is_the_written_pixels_in_nchw_normalized_by_the_training_stats(
    tmp_path, monkeypatch
):
    train, test = write_cifar(
        tmp_path, tvd.CIFAR10, monkeypatch, train_sizes=[4, 3, 4, 2, 3], test_size=6
    )
    src = open_source(DatasetSpec(name="cifar10", root=str(tmp_path), download=False))
    held = open_source(DatasetSpec(name="cifar10", split="test", root=str(tmp_path)))
    assert (src.count, held.count) == (16, 6)
    assert src.sample_shape == (3, 32, 32) and src.num_classes == 10
    assert same_bytes(src.batch(0, 16), normalized(train, CIFAR10_MEAN, CIFAR10_STD))
    assert same_bytes(held.batch(2, 5), normalized(test[2:5], CIFAR10_MEAN, CIFAR10_STD))
    assert src.transform["normalize"] == {"mean": list(CIFAR10_MEAN), "std": list(CIFAR10_STD)}
    assert src.fingerprint != held.fingerprint


def test_cifar100_has_100_classes_its_own_stats_and_both_splits(tmp_path, monkeypatch):
    train, test = write_cifar(tmp_path, tvd.CIFAR100, monkeypatch, train_sizes=[12], test_size=5)
    src = open_source(DatasetSpec(name="cifar100", root=str(tmp_path), download=False))
    held = open_source(DatasetSpec(name="cifar100", split="test", root=str(tmp_path)))
    assert (src.count, held.count, src.num_classes) == (12, 5, 100)
    assert same_bytes(src.batch(0, 12), normalized(train, CIFAR100_MEAN, CIFAR100_STD))
    assert same_bytes(held.batch(0, 5), normalized(test, CIFAR100_MEAN, CIFAR100_STD))


def test_cifar_split_options_and_limit(tmp_path, monkeypatch):
    write_cifar(tmp_path, tvd.CIFAR10, monkeypatch, train_sizes=[2] * 5, test_size=2)
    with pytest.raises(ConfigError, match=r"'cifar10' has splits 'train' and 'test', not 'val'"):
        open_source(DatasetSpec(name="cifar10", split="val", root=str(tmp_path)))
    with pytest.raises(ConfigError, match=r"unknown option\(s\) for dataset 'cifar10': crop"):
        open_source(DatasetSpec(name="cifar10", root=str(tmp_path), options={"crop": 8}))
    with pytest.raises(ConfigError, match=r"'resize' of dataset 'cifar10' must be an integer"):
        open_source(DatasetSpec(name="cifar10", root=str(tmp_path), options={"resize": "8"}))
    big = open_source(DatasetSpec(name="cifar10", root=str(tmp_path), options={"resize": 8}))
    assert big.sample_shape == (3, 8, 8) and big.batch(0, 3).shape == (3, 3, 8, 8)
    full = open_source(DatasetSpec(name="cifar10", root=str(tmp_path)))
    assert big.fingerprint != full.fingerprint
    cut = open_source(DatasetSpec(name="cifar10", root=str(tmp_path), limit=7))
    assert cut.count == 7 and cut.fingerprint != full.fingerprint
    assert same_bytes(all_batches(cut), full.batch(0, 7))


def test_missing_cifar_names_the_folder_and_foreign_checksums_are_refused(tmp_path, monkeypatch):
    with pytest.raises(DataError, match=r"cifar100 not found under '.*/cifar-100-python'.*is off"):
        open_source(DatasetSpec(name="cifar100", root=str(tmp_path), download=False))
    write_cifar(tmp_path, tvd.CIFAR10, monkeypatch, train_sizes=[1] * 5, test_size=1)
    monkeypatch.undo()  # the real checksums: our fake files are not CIFAR-10
    with pytest.raises(DataError, match=r"cifar10 not found under '.*/cifar-10-batches-py'"):
        open_source(DatasetSpec(name="cifar10", root=str(tmp_path), download=False))


def test_failed_cifar_download_is_a_clear_error(tmp_path, monkeypatch):
    def offline(self):
        raise RuntimeError("Error downloading cifar-10-python.tar.gz: no network")

    monkeypatch.setattr(tvd.CIFAR10, "download", offline)
    with pytest.raises(DataError, match=r"cifar10 not found under .*download failed .*no network"):
        open_source(DatasetSpec(name="cifar10", root=str(tmp_path), download=True))


# -- image folders -------------------------------------------------------------------

RGB_SIZES = {"cat/a.png": (40, 30), "cat/b.png": (25, 50), "emu/deep/c.png": (64, 48)}
GRAY_SIZES = {"dog/d.png": (33, 33), "dog/e.png": (21, 45)}


def make_folder(path: Path, seed: int = 0) -> Path:
    """Three classes of PNGs, RGB and grayscale, of different sizes, plus a non-image file."""
    rng = np.random.default_rng(seed)
    for rel, (w, h) in {**RGB_SIZES, **GRAY_SIZES}.items():
        shape = (h, w, 3) if rel in RGB_SIZES else (h, w)
        (path / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, size=shape, dtype=np.uint8)).save(path / rel)
    (path / "cat" / "notes.txt").write_text("not an image")
    return path


def reference(folder: Path, resize: int, crop: int, normalize, mode: str = "RGB") -> torch.Tensor:
    """torchvision's ImageFolder with Resize, CenterCrop, ToTensor, Normalize."""

    def loader(p):
        with Image.open(p) as im:
            return im.convert(mode)

    ds = tvd.ImageFolder(
        str(folder),
        loader=loader,
        transform=T.Compose([T.Resize(resize), T.CenterCrop(crop), T.ToTensor(), normalize]),
    )
    return torch.stack([ds[i][0] for i in range(len(ds))])


SMALL = {"resize": 20, "crop": 16}


def folder_spec(path, **options) -> DatasetSpec:
    return DatasetSpec(name=f"imagefolder:{path}", options={**SMALL, **options})


def test_imagefolder_equals_torchvision_imagefolder_with_resize_crop_normalize(tmp_path):
    folder = make_folder(tmp_path / "imgs")
    src = open_source(folder_spec(folder))
    assert src.count == 5 and src.num_classes == 3 and src.sample_shape == (3, 16, 16)
    assert same_bytes(src.batch(0, 5), reference(folder, 20, 16, IMAGENET))
    assert src.transform["resize"]["shorter_side"] == 20 and src.transform["center_crop"] == [
        16,
        16,
    ]
    gray = open_source(folder_spec(folder, grayscale=True, mean=[0.5], std=[0.25]))
    assert gray.sample_shape == (1, 16, 16)
    want = reference(folder, 20, 16, T.Normalize((0.5,), (0.25,)), mode="L")
    assert same_bytes(gray.batch(0, 5), want)


def test_imagefolder_batches_are_fixed_in_any_order_and_across_openings(tmp_path):
    folder = make_folder(tmp_path / "imgs")
    a, b = open_source(folder_spec(folder)), open_source(folder_spec(folder))
    whole = a.batch(0, 5)
    assert same_bytes(b.batch(3, 5), whole[3:5]) and same_bytes(b.batch(0, 2), whole[0:2])
    assert same_bytes(all_batches(a, shard_size=2, batch_size=1), whole)
    assert a.fingerprint == b.fingerprint and a.describe() == b.describe()
    # ImageFolder order: classes sorted, then paths; the text file is not an image.
    assert a.files == ["cat/a.png", "cat/b.png", "dog/d.png", "dog/e.png", "emu/deep/c.png"]


def test_normalize_compute_gives_mean_0_std_1_per_channel_over_the_folder(tmp_path):
    folder = make_folder(tmp_path / "imgs")
    for extra, channels in (({}, 3), ({"grayscale": True}, 1)):
        src = open_source(folder_spec(folder, normalize="compute", **extra))
        x = src.batch(0, src.count).double().transpose(0, 1).reshape(channels, -1)
        assert x.mean(1).abs().max() < 1e-5
        assert (x.std(1, correction=0) - 1).abs().max() < 1e-5
        norm = src.transform["normalize"]
        assert norm["from"] == "computed" and len(norm["mean"]) == len(norm["std"]) == channels
    fixed = open_source(folder_spec(folder))
    assert fixed.transform["normalize"]["from"] == "imagenet"
    assert fixed.fingerprint != open_source(folder_spec(folder, normalize="compute")).fingerprint


def test_imagefolder_fingerprint_follows_files_and_options(tmp_path):
    folder = make_folder(tmp_path / "imgs")
    before = open_source(folder_spec(folder)).fingerprint
    assert open_source(folder_spec(folder)).fingerprint == before
    assert open_source(folder_spec(folder, crop=12)).fingerprint != before
    target = folder / "dog" / "d.png"
    st = target.stat()
    os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns + 1))  # touched: same bytes, new mtime
    touched = open_source(folder_spec(folder)).fingerprint
    assert touched != before
    # New pixels (a rewrite also moves the mtime; files are not hashed, only stat-ed).
    Image.fromarray(np.zeros((33, 33), dtype=np.uint8)).save(target)
    os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))
    assert open_source(folder_spec(folder)).fingerprint not in (before, touched)
    os.rename(folder / "emu", folder / "fox")  # a renamed class
    assert open_source(folder_spec(folder)).fingerprint != before


def test_imagefolder_splits(tmp_path):
    plain = make_folder(tmp_path / "plain")
    assert open_source(DatasetSpec(name=f"imagefolder:{plain}", split="train")).count == 5
    with pytest.raises(ConfigError, match=r"has only the split 'train' .* not 'test'"):
        open_source(DatasetSpec(name=f"imagefolder:{plain}", split="test"))
    split = tmp_path / "split"
    make_folder(split / "train")
    make_folder(split / "val", seed=1)
    (split / "val" / "cat" / "a.png").unlink()
    train = open_source(DatasetSpec(name=f"imagefolder:{split}", split="train"))
    test = open_source(DatasetSpec(name=f"imagefolder:{split}", split="test"))
    val = open_source(DatasetSpec(name=f"imagefolder:{split}", split="val"))
    assert (train.count, test.count) == (5, 4) and test.fingerprint == val.fingerprint
    with pytest.raises(ConfigError, match=r"splits 'train', 'test', 'val' .* not 'holdout'"):
        open_source(DatasetSpec(name=f"imagefolder:{split}", split="holdout"))
    (split / "train").rename(split / "later")
    with pytest.raises(ConfigError, match=r"splits 'test', 'val' .*val/.* not 'train'"):
        open_source(DatasetSpec(name=f"imagefolder:{split}", split="train"))


def test_imagefolder_path_is_relative_to_the_data_root(tmp_path):
    make_folder(tmp_path / "imgs")
    src = open_source(DatasetSpec(name="imagefolder:imgs", root=str(tmp_path), options=SMALL))
    assert src.folder == tmp_path / "imgs" and src.count == 5


def test_imagefolder_errors_name_the_folder_or_option(tmp_path):
    with pytest.raises(DataError, match=r"image folder '.*/nope' .* not found"):
        open_source(folder_spec(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=r"'.*/empty' has no class folders"):
        open_source(folder_spec(tmp_path / "empty"))
    (tmp_path / "hollow" / "cls").mkdir(parents=True)
    with pytest.raises(DataError, match=r"'.*/hollow': Found no valid file for the classes cls"):
        open_source(folder_spec(tmp_path / "hollow"))
    with pytest.raises(ConfigError, match=r"needs a folder: imagefolder:PATH"):
        open_source(DatasetSpec(name="imagefolder:"))
    folder = make_folder(tmp_path / "imgs")
    bad = [
        ({"sizes": 3}, r"unknown option\(s\) .*: sizes; known: crop, grayscale"),
        ({"crop": 30}, r"'crop' .* \(30\) must not exceed 'resize' \(20\)"),
        ({"resize": "20"}, r"'resize' .* must be an integer >= 1, got '20'"),
        ({"grayscale": True}, r"grayscale there is no default normalization"),
        ({"mean": [0.5, 0.5, 0.5]}, r"give both 'mean' and 'std'"),
        ({"mean": [0.5], "std": [1.0]}, r"'mean' .* list of 3 finite numbers"),
        ({"mean": [0, 0, 0], "std": [1, 0, 1]}, r"'std' .* list of 3 positive numbers"),
        ({"normalize": "compute", "std": [1, 1, 1]}, r"do not also give std"),
        ({"normalize": "auto"}, r"'normalize' .* 'fixed' or 'compute', got 'auto'"),
    ]
    for options, message in bad:
        with pytest.raises(ConfigError, match=message):
            open_source(folder_spec(folder, **options))
    (folder / "cat" / "b.png").write_bytes(b"not a png")
    src = open_source(folder_spec(folder))  # decoding is lazy: the bad file shows on read
    with pytest.raises(DataError, match=r"cannot read image '.*/cat/b\.png'"):
        src.batch(0, 2)


def test_imagefolder_pickles_and_reopens_from_its_spec_without_recomputing(tmp_path, monkeypatch):
    from lsuv_pipeline import data

    folder = make_folder(tmp_path / "imgs")
    src = open_source(folder_spec(folder, normalize="compute"))
    whole = src.batch(0, 5)
    copy = pickle.loads(pickle.dumps(src))
    assert same_bytes(copy.batch(0, 5), whole) and copy.describe() == src.describe()
    assert "_computed" in src.spec.options  # the numbers travel to workers with the spec

    def no_recompute(self):
        raise AssertionError("statistics recomputed")

    monkeypatch.setattr(data.folder._FolderSource, "_folder_stats", no_recompute)
    again = open_source(src.spec)
    assert same_bytes(again.batch(0, 5), whole) and again.describe() == src.describe()
    assert again.spec == src.spec
    monkeypatch.undo()
    # Changed files invalidate the carried numbers: they are computed again.
    target = folder / "cat" / "a.png"
    Image.fromarray(np.full((30, 40, 3), 7, dtype=np.uint8)).save(target)
    os.utime(target, ns=(1, 2))
    changed = open_source(src.spec)
    assert changed.transform["normalize"]["mean"] != src.transform["normalize"]["mean"]


def test_imagefolder_limit_is_the_first_files(tmp_path):
    folder = make_folder(tmp_path / "imgs")
    full = open_source(folder_spec(folder))
    cut = open_source(DatasetSpec(**{**folder_spec(folder).to_dict(), "limit": 3}))
    four = open_source(DatasetSpec(**{**folder_spec(folder).to_dict(), "limit": 4}))
    assert cut.count == 3 and len({full.fingerprint, cut.fingerprint, four.fingerprint}) == 3
    assert same_bytes(all_batches(cut, shard_size=2, batch_size=2), full.batch(0, 3))
    assert [(s.start, s.stop) for s in cut.shards(2)] == [(0, 2), (2, 3)]
    copy = pickle.loads(pickle.dumps(cut))
    assert same_bytes(copy.batch(0, 3), full.batch(0, 3)) and copy.fingerprint == cut.fingerprint
    assert open_source(cut.spec).fingerprint == cut.fingerprint


# -- user data through the Python API ----------------------------------------------


def test_source_from_a_tensor_dataset_is_random_access_with_a_spot_check_fingerprint():
    x = torch.randn(50, 2, 4, 4)
    ds = TensorDataset(x, torch.arange(50))
    src = source_from(ds, name="mine")
    assert src.spec is None and src.count == 50 and src.sample_shape == (2, 4, 4)
    assert same_bytes(src.batch(7, 19), x[7:19])
    assert same_bytes(all_batches(src, shard_size=16, batch_size=5), x)
    assert source_from(TensorDataset(x.clone())).fingerprint == src.fingerprint
    moved = x.clone()
    moved[49] += 1  # the last sample is always in the spot check
    assert source_from(TensorDataset(moved)).fingerprint != src.fingerprint
    assert source_from(ds, fingerprint="v3").fingerprint == "v3"
    assert source_from(src) is src
    cut = limited(src, 20)
    assert cut.count == 20 and cut.fingerprint != src.fingerprint and cut.spec is None
    assert same_bytes(all_batches(cut, shard_size=16, batch_size=5), x[:20])
    again = pickle.loads(pickle.dumps(cut))
    assert same_bytes(again.batch(0, 20), x[:20]) and again.fingerprint == cut.fingerprint


class Records(Dataset):
    """Items as dicts of uint8 images: only a collate can turn them into batches."""

    def __init__(self, images: torch.Tensor) -> None:
        self.images = images

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> dict:
        return {"image": self.images[i], "id": i}


def to_unit(items: list[dict]) -> torch.Tensor:
    return torch.stack([it["image"] for it in items]).float().div(255)


def test_source_from_a_dataset_with_a_custom_collate():
    images = torch.randint(0, 256, (9, 1, 3, 3), dtype=torch.uint8)
    src = source_from(Records(images), collate=to_unit)
    assert same_bytes(src.batch(2, 6), images[2:6].float().div(255))
    assert src.transform["user"]["collate"].endswith("test_sources.to_unit")
    records = source_from(Records(images)).batch(2, 6)  # dict items stack into a dict batch
    assert set(records) == {"image", "id"} and records["id"].tolist() == [2, 3, 4, 5]
    assert records["image"].dtype == torch.uint8  # integers stay integers (token ids)
    with pytest.raises(ConfigError, match=r"is a str, not a tensor .* collate="):
        source_from([["a", "b"]])
    with pytest.raises(ConfigError, match=r"is a dict holding str, not a tensor .* collate="):
        source_from([{"text": "a b", "ids": torch.zeros(1, 3)}])
    assert limited(src, 4).count == 4
    with pytest.raises(DataError, match=r"has no samples"):
        source_from(TensorDataset(torch.zeros(0, 3)))


def uneven_batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(n, 3, generator=g), torch.zeros(n)) for n in (3, 5, 2, 4)]


def test_source_from_a_list_of_batches_shards_by_whole_batches_and_reads_them_once():
    data = uneven_batches()
    every = torch.cat([x for x, _ in data])
    src = source_from(data)
    assert src.count == 14 and src.sample_shape == (3,) and src.spec is None
    parts = src.shards(8)
    assert [(s.start, s.stop) for s in parts] == [(0, 8), (8, 14)]  # 3+5 | 2+4
    got = [b for s in parts for b in src.batches(s, 100)]  # the caller's batch size is ignored
    assert [b.shape[0] for b in got] == [3, 5, 2, 4] and same_bytes(torch.cat(got), every)
    assert src.iterations == 1  # one pass in order: one iteration, no restarts
    assert same_bytes(src.batch(2, 9), every[2:9])  # behind the cursor: restart and skip
    assert src.iterations == 2
    odd = shards(src.count, 4)  # shards that cut batches still read every sample once
    assert same_bytes(torch.cat([b for s in odd for b in src.batches(s, 100)]), every)
    assert [len(s) for s in src.shards(1)] == [3, 5, 2, 4]  # at least one batch a shard
    copy = pickle.loads(pickle.dumps(src))
    assert copy.iterations == src.iterations and same_bytes(copy.batch(0, 14), every)
    assert source_from(uneven_batches()).fingerprint == src.fingerprint
    data[3][0][-1, 0] += 1  # the very last sample is always in the spot check
    assert source_from(data).fingerprint != src.fingerprint


def test_limit_of_a_list_of_batches_cuts_the_last_batch():
    data = uneven_batches()
    every = torch.cat([x for x, _ in data])
    src = source_from(data)
    cut = limited(src, 6)
    assert cut.count == 6 and cut.fingerprint != src.fingerprint
    assert [(s.start, s.stop) for s in cut.shards(8)] == [(0, 6)]
    assert [b.shape[0] for s in cut.shards(8) for b in cut.batches(s, 100)] == [3, 3]
    assert same_bytes(all_batches(cut), every[:6])
    assert limited(src, 14) is src and limited(src, None) is src
    with pytest.raises(ConfigError, match=r"--limit must be at least 1"):
        limited(src, 0)


def test_source_from_a_dataloader_without_shuffle():
    x = torch.randn(10, 2, 3)
    ds = TensorDataset(x, torch.arange(10))
    src = source_from(DataLoader(ds, batch_size=4))
    assert src.count == 10 and [len(s) for s in src.shards(4)] == [4, 4, 2]
    assert same_bytes(all_batches(src), x)
    assert same_bytes(source_from(DataLoader(ds, batch_size=4)).batch(0, 10), x)
    cut = limited(src, 5)
    assert same_bytes(all_batches(cut), x[:5]) and cut.fingerprint != src.fingerprint
    with pytest.raises(ConfigError, match=r"shuffles .* shuffle=False"):
        source_from(DataLoader(ds, batch_size=4, shuffle=True))


def test_source_from_refuses_what_cannot_be_read_the_same_way_twice():
    class Stream(torch.utils.data.IterableDataset):
        def __iter__(self):
            yield torch.zeros(2)

    class Unsized:
        def __iter__(self):
            yield torch.zeros(2, 2)

    with pytest.raises(ConfigError, match=r"IterableDataset"):
        source_from(Stream())
    with pytest.raises(ConfigError, match=r"has no len\(\)"):
        source_from(Unsized())
    with pytest.raises(ConfigError, match=r"has no len\(\)"):
        source_from(t for t in [torch.zeros(2, 2)])
    with pytest.raises(ConfigError, match=r"shape \(3,\), batch 0 has \(2,\)"):
        source_from([torch.zeros(2, 2), torch.zeros(2, 3)])


def test_a_batch_list_that_changes_between_passes_is_an_error():
    data = [torch.zeros(2, 1), torch.ones(3, 1)]
    src = source_from(data)
    data[1] = torch.ones(4, 1)
    with pytest.raises(DataError, match=r"batch 1 .* has 4 samples, 3 when opened"):
        src.batch(0, 5)


# -- specs ---------------------------------------------------------------------------


def test_spec_options_round_trip_through_json_and_stay_hashable_and_read_only():
    spec = DatasetSpec(name="imagefolder:x", options={"mean": (0.5, 0.5, 0.5), "resize": 64})
    back = DatasetSpec.from_dict(json.loads(json.dumps(spec.to_dict())))
    assert back == spec and hash(back) == hash(spec) and back.key() == spec.key()
    assert json.loads(spec.key())["options"] == {"mean": [0.5, 0.5, 0.5], "resize": 64}
    assert DatasetSpec(name="mnist").to_dict()["options"] == {}
    with pytest.raises(TypeError, match=r"read-only"):
        spec.options["resize"] = 32
    with pytest.raises(ConfigError, match=r"JSON values"):
        DatasetSpec(name="mnist", options={"f": object()})
    assert pickle.loads(pickle.dumps(spec)) == spec


def test_mnist_refuses_options_and_unknown_names_list_every_dataset(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown option\(s\) for dataset 'mnist': crop"):
        open_source(DatasetSpec(name="mnist", root=str(tmp_path), options={"crop": 3}))
    message = r"unknown dataset 'cifar10:x'.*cifar10, cifar100, fashion-mnist, imagefolder:PATH"
    with pytest.raises(DataError, match=message):
        open_source(DatasetSpec(name="cifar10:x", root=str(tmp_path)))


def test_spec_sources_survive_pickle_and_reopen_in_the_same_state(tmp_path, monkeypatch):
    write_cifar(tmp_path, tvd.CIFAR10, monkeypatch, train_sizes=[2] * 5, test_size=2)
    make_folder(tmp_path / "imgs")
    specs = [
        DatasetSpec(name="cifar10", root=str(tmp_path), limit=6),
        DatasetSpec(name="imagefolder:imgs", root=str(tmp_path), options=SMALL),
    ]
    for spec in specs:
        src = open_source(spec)
        for other in (pickle.loads(pickle.dumps(src)), open_source(src.spec), open_source(spec)):
            assert other.describe() == src.describe() and other.spec == src.spec
            assert same_bytes(all_batches(other), all_batches(src))


def test_shard_of_a_limit_beyond_its_end_reads_nothing():
    src = limited(source_from(TensorDataset(torch.randn(10, 2))), 4)
    assert list(src.batches(Shard(1, 5, 10), 2)) == []


def test_raw_batches_of_a_folder_and_its_views_give_the_batches_byte_for_byte(tmp_path):
    folder = make_folder(tmp_path / "imgs")
    spec = folder_spec(folder)
    for src in (
        open_source(spec),
        open_source(DatasetSpec(**{**spec.to_dict(), "limit": 4})),
        open_source(DatasetSpec(**{**spec.to_dict(), "sample": 3, "sample_seed": 1})),
    ):
        for start, stop in ((0, src.count), (1, 3), (2, 2)):
            raw = src.raw_batch(start, stop)
            assert raw.dtype == torch.uint8
            assert same_bytes(src.from_raw(raw), src.batch(start, stop))
