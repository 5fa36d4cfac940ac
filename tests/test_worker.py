"""The dask worker side: one state object per run, its budgets, its model copies."""

import threading

import torch
from torch import nn

from lsuv_pipeline import worker
from lsuv_pipeline.data import Shard, TensorSource
from lsuv_pipeline.shard import CachePlan, PassPlan


def source(n=300):
    images = torch.arange(n * 64, dtype=torch.int64).remainder(256).to(torch.uint8)
    return TensorSource(
        name="toy", split="train", images=images.view(n, 1, 8, 8), mean=(0.0,), std=(1.0,)
    )


def test_a_new_run_gets_a_fresh_state_with_its_own_budget(monkeypatch):
    monkeypatch.setenv("LSUV_WORKER_CACHE_MB", "1")
    first = worker._state("run-a")
    assert first.budget == 1 << 20 and worker._state("run-a") is first
    first.shards[("x",)] = [torch.zeros(1)]
    monkeypatch.setenv("LSUV_WORKER_CACHE_MB", "3")
    second = worker._state("run-b")
    assert second is not first and second.budget == 3 << 20 and not second.shards


def test_decoded_shards_are_kept_within_the_budget_oldest_out_first():
    src = source()
    state = worker.WorkerState(run="r", budget=2 * 100 * 64 * 4)  # two shards of 100 samples
    shards = [Shard(i, 100 * i, 100 * (i + 1)) for i in range(3)]
    for s in shards:
        state.batches(src, s, 50)
    kept = [key[1] for key in state.shards]
    assert kept == [100, 200] and state.shard_bytes <= state.budget
    again = state.batches(src, shards[2], 50)
    assert again is state.shards[next(k for k in state.shards if k[1] == 200)]  # not decoded again


def test_each_thread_gets_its_own_model_copy_loaded_once_per_pass():
    torch.manual_seed(0)
    boxed = worker.Boxed(nn.Linear(3, 2))
    state = worker.WorkerState(run="r")
    weights = {k: v.clone() for k, v in boxed.model.state_dict().items()}
    a = state.model(boxed, "m", weights, "pass-1", torch.device("cpu"))
    assert a is not boxed.model and a is state.model(boxed, "m", weights, "pass-1", "cpu")
    seen = []
    t = threading.Thread(
        target=lambda: seen.append(state.model(boxed, "m", weights, "pass-1", "cpu"))
    )
    t.start()
    t.join()
    assert seen[0] is not a  # another thread, another copy
    zeros = {k: torch.zeros_like(v) for k, v in weights.items()}
    b = state.model(boxed, "m", zeros, "pass-2", torch.device("cpu"))
    assert b is a and torch.count_nonzero(b.weight) == 0  # the next pass's weights loaded


def test_the_activation_cache_budget_is_the_runs_not_the_first_ones():
    plan = lambda budget: PassPlan((), None, 10, cache=CachePlan("t", (), 0, budget))  # noqa: E731
    first = worker.WorkerState(run="one")
    assert first.runner(plan(1000), torch.device("cpu")).cache.budget == 1000
    second = worker.WorkerState(run="two")
    assert second.runner(plan(5000), torch.device("cpu")).cache.budget == 5000


def test_an_image_folders_shards_are_kept_as_uint8_pixels_and_give_the_same_batches(tmp_path):
    import numpy as np
    from PIL import Image

    from lsuv_pipeline.data import DatasetSpec, open_source

    rng = np.random.default_rng(0)
    for i in range(6):
        (tmp_path / "imgs" / f"c{i % 2}").mkdir(parents=True, exist_ok=True)
        pixels = rng.integers(0, 256, size=(24 + i, 30, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(tmp_path / "imgs" / f"c{i % 2}" / f"{i}.jpg")
    spec = DatasetSpec(name=f"imagefolder:{tmp_path / 'imgs'}", options={"resize": 20, "crop": 16})
    shard = Shard(0, 0, 6)
    state = worker.WorkerState(run="r")
    state.batches(spec, shard, 4)
    (kept,) = state.shards.values()
    assert [b.dtype for b in kept] == [torch.uint8, torch.uint8]  # before x / 255: 1 byte each
    assert state.shard_bytes == 6 * 3 * 16 * 16
    want = list(open_source(spec).batches(shard, 4))
    got = list(state.inputs(spec, shard, 4))
    assert [b.dtype for b in got] == [torch.float32] * 2
    assert all(a.numpy().tobytes() == b.numpy().tobytes() for a, b in zip(got, want, strict=True))
