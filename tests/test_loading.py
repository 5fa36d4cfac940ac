"""Parallel loading: threads decode and read ahead, and nothing about a batch changes."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import Dataset

from lsuv_pipeline import RunConfig, compute
from lsuv_pipeline.data import DatasetSpec, Shard, open_source, source_from
from lsuv_pipeline.data.loading import default_workers, ordered_map, prefetched
from lsuv_pipeline.errors import ConfigError, DataError
from lsuv_pipeline.executors import InlineExecutor
from lsuv_pipeline.shard import PassPlan
from tests.stores import assert_same_bytes


def prefetch_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "lsuv-prefetch"]


def jpeg_folder(path: Path, count: int = 24) -> Path:
    """JPEGs of random sizes in three classes: each decodes and resizes differently."""
    rng = np.random.default_rng(0)
    for i in range(count):
        w, h = (int(v) for v in rng.integers(20, 60, size=2))
        (path / f"c{i % 3}").mkdir(parents=True, exist_ok=True)
        pixels = rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(path / f"c{i % 3}" / f"{i:03d}.jpg", quality=85)
    return path


def folder_spec(path: Path) -> DatasetSpec:
    return DatasetSpec(name=f"imagefolder:{path}", options={"resize": 20, "crop": 16})


def test_default_workers_are_the_cores_available_at_most_8():
    assert 1 <= default_workers() <= min(8, len(__import__("os").sched_getaffinity(0)))


def test_ordered_map_keeps_the_order_and_raises_the_first_error_as_it_was():
    assert ordered_map(lambda i: i * i, range(50), 4) == [i * i for i in range(50)]

    def fail(i):
        if i in (7, 30):
            raise DataError(f"cannot read image {i}")
        return i

    with pytest.raises(DataError, match="cannot read image 7"):
        ordered_map(fail, range(50), 4)


def test_image_folder_batches_are_the_same_bytes_with_0_and_n_loader_workers(tmp_path):
    folder = jpeg_folder(tmp_path / "imgs")
    serial = open_source(folder_spec(folder))
    parallel = open_source(folder_spec(folder)).set_loader_workers(4)
    assert parallel.loader_workers == 4 and serial.loader_workers == 0
    assert parallel.fingerprint == serial.fingerprint
    for start, stop in ((0, 24), (5, 17), (23, 24)):
        a, b = serial.batch(start, stop), parallel.batch(start, stop)
        assert a.shape == b.shape and a.numpy().tobytes() == b.numpy().tobytes()


def test_loader_workers_reach_the_source_under_a_limit_or_a_sample(tmp_path):
    folder = jpeg_folder(tmp_path / "imgs")
    spec = folder_spec(folder)
    for view in (
        open_source(DatasetSpec(**{**spec.to_dict(), "limit": 10})),
        open_source(DatasetSpec(**{**spec.to_dict(), "sample": 10})),
    ):
        view.set_loader_workers(3)
        assert view.inner.loader_workers == 3
        assert (
            view.batch(0, 10).numpy().tobytes()
            == view.set_loader_workers(0).batch(0, 10).numpy().tobytes()
        )


def test_a_bad_image_is_a_data_error_naming_it_from_the_decode_threads(tmp_path):
    folder = jpeg_folder(tmp_path / "imgs")
    (folder / "c1" / "004.jpg").write_bytes(b"not a jpeg")
    src = open_source(folder_spec(folder)).set_loader_workers(4)
    with pytest.raises(DataError, match=r"cannot read image '.*/c1/004\.jpg'"):
        src.batch(0, 24)
    reader = prefetched(src.batches(Shard(0, 0, 24), 4))  # and from the read-ahead thread
    with pytest.raises(DataError, match=r"cannot read image '.*/c1/004\.jpg'"):
        list(reader)
    assert not prefetch_threads()


class Items(Dataset):
    def __len__(self):
        return 40

    def __getitem__(self, i):
        return torch.full((2, 3), float(i)), i % 5


def test_a_users_dataset_is_read_the_same_with_loader_workers():
    serial = source_from(Items(), name="items")
    parallel = source_from(Items(), name="items").set_loader_workers(4, callers_items=True)
    assert torch.equal(serial.batch(0, 40), parallel.batch(0, 40))
    assert serial.fingerprint == parallel.fingerprint


def test_prefetched_yields_every_item_in_order_and_ends_its_thread():
    assert list(prefetched(iter(range(100)), depth=2)) == list(range(100))
    assert list(prefetched([])) == []
    assert not prefetch_threads()


def test_prefetched_reads_ahead_while_the_consumer_holds_a_batch():
    produced = []
    second = threading.Event()

    def source():
        for i in range(5):
            produced.append(i)
            if i == 1:
                second.set()
            yield i

    reader = prefetched(source(), depth=2)
    assert next(reader) == 0
    assert second.wait(timeout=30)  # batch 1 made while the consumer holds batch 0
    assert list(reader) == [1, 2, 3, 4]


def test_prefetched_reraises_the_producers_error_unchanged():
    error = DataError("cannot read image '/x/a.jpg'")

    def source():
        yield 1
        raise error

    reader = prefetched(source())
    assert next(reader) == 1
    with pytest.raises(DataError) as caught:
        next(reader)
    assert caught.value is error
    assert not prefetch_threads()


@pytest.mark.parametrize("how", ["close", "error in the consumer", "keyboard interrupt"])
def test_stopping_early_ends_the_thread_and_closes_the_source(how):
    closed = threading.Event()

    def endless():
        try:
            i = 0
            while True:
                yield torch.full((2,), float(i))
                i += 1
        finally:
            closed.set()

    reader = prefetched(endless(), depth=2)
    if how == "close":
        next(reader)
        reader.close()
    else:
        kind = RuntimeError if how == "error in the consumer" else KeyboardInterrupt
        with pytest.raises(kind):
            try:
                for _ in reader:
                    raise kind("stop")
            finally:
                reader.close()  # what the passes do (shard.closed_after)
    assert closed.is_set()
    assert not prefetch_threads()


def test_a_pass_that_stops_early_leaves_no_read_ahead_thread(tmp_path):
    source = open_source(folder_spec(jpeg_folder(tmp_path / "imgs"))).set_loader_workers(2)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 2, 3))
    plan = PassPlan(layers=(), stop_after=None, batch_size=2)

    def stop(n):
        raise KeyboardInterrupt

    passes = InlineExecutor().run_pass(
        model, source, source.shards(24), plan, device=torch.device("cpu"), on_batch=stop
    )
    with pytest.raises(KeyboardInterrupt) as caught:
        list(passes)
    assert not prefetch_threads()  # ended by the pass, while its frames are still alive
    assert caught.traceback


def test_a_run_is_the_same_bytes_and_the_same_run_with_any_loader_workers(tmp_path):
    folder = jpeg_folder(tmp_path / "imgs")
    config = RunConfig(
        dataset=f"imagefolder:{folder}",
        dataset_options={"resize": 20, "crop": 16, "grayscale": True, "mean": [0.5], "std": [0.25]},
        model="tests.fixtures.user_models:small_cnn",
        holdout=None,
        shard_size=10,
        batch_size=4,
    )
    kwargs = dict(device="cpu", model=None)
    serial = compute(config, tmp_path / "a.zarr", loader_workers=0, **kwargs)
    parallel = compute(config, tmp_path / "b.zarr", loader_workers=3, **kwargs)
    assert_same_bytes(serial.path, parallel.path)
    again = compute(config, tmp_path / "a.zarr", loader_workers=5, **kwargs)
    assert again.up_to_date  # not "another run"
    with pytest.raises(ConfigError, match="loader_workers must be an integer >= 0"):
        compute(config, tmp_path / "c.zarr", loader_workers=-1, **kwargs)


def test_the_cli_takes_loader_workers_of_0_or_more(tmp_path):
    from click.testing import CliRunner

    from lsuv_pipeline.cli import cli

    bad = CliRunner().invoke(cli, ["compute", "--loader-workers", "-1", "--out", str(tmp_path)])
    assert bad.exit_code == 2 and "--loader-workers" in bad.output
    assert "--loader-workers" in CliRunner().invoke(cli, ["compute", "--help"]).output


class OneAtATime(Dataset):
    """A Dataset that cannot be read from two threads at once (an open file handle)."""

    def __init__(self, n: int = 96) -> None:
        self.x = torch.randn(n, 1, 6, 6, generator=torch.Generator().manual_seed(0))
        self.busy = threading.Lock()
        self.overlapped = 0

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i):
        if not self.busy.acquire(blocking=False):
            self.overlapped += 1
            self.busy.acquire()
        try:
            threading.Event().wait(0.001)  # long enough for another thread to come in
            return self.x[i]
        finally:
            self.busy.release()


def test_a_callers_dataset_is_read_one_item_at_a_time_unless_loader_workers_are_given(
    tmp_path,
):
    model = torch.nn.Sequential(
        torch.nn.Conv2d(1, 2, 3), torch.nn.Flatten(), torch.nn.Linear(32, 3)
    )
    data = OneAtATime()
    config = RunConfig(dataset="d", holdout=None, verify=False, batch_size=32)
    compute(config, tmp_path / "a.zarr", model=model, data=data, device="cpu")
    assert data.overlapped == 0
    compute(config, tmp_path / "b.zarr", model=model, data=data, device="cpu", loader_workers=4)
    assert data.overlapped > 0  # asked for: several threads in __getitem__
