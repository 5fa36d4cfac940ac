"""On a CUDA device: the solve works, is reproducible, and the cache changes no bit.

Skipped where no CUDA device is present (the CI machines have none).
"""

import pytest
import torch
import zarr

from lsuv_pipeline import RunConfig, compute
from lsuv_pipeline import moments as mom
from tests.stores import same_bytes

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device here"),
]

CONFIG = RunConfig(limit=4000, shard_size=1000, batch_size=250, holdout=None)


def test_cuda_solve_is_exact_and_reproducible(tmp_path, data_root):
    a, b = tmp_path / "a.zarr", tmp_path / "b.zarr"
    result = compute(CONFIG, a, data_root=data_root, device="cuda")
    compute(CONFIG, b, data_root=data_root, device="cuda")
    assert zarr.open_group(str(a), mode="r").attrs["device"] == "cuda"
    assert same_bytes(a, b)  # TF32 off, deterministic cuDNN: the same bits twice
    for s in result.layers:
        t = mom.reduce_channels(s.after["train"])
        assert abs(t.mean.item()) < 1e-4 and abs(t.std.item() - 1) < 1e-4, s.name


def test_cuda_cache_on_and_off_give_the_same_bytes(tmp_path, data_root):
    on, off = tmp_path / "on.zarr", tmp_path / "off.zarr"
    compute(CONFIG, on, data_root=data_root, device="cuda", cache=True)
    compute(CONFIG, off, data_root=data_root, device="cuda", cache=False)
    assert same_bytes(on, off)


def test_cuda_dask_worker_gives_the_inline_bytes(tmp_path, data_root):
    inline, dask = tmp_path / "inline.zarr", tmp_path / "dask.zarr"
    compute(CONFIG, inline, data_root=data_root, device="cuda")
    compute(CONFIG, dask, data_root=data_root, device="cuda", workers=1)
    assert same_bytes(inline, dask)


def test_cuda_pass_reads_pinned_batches_ahead_with_no_host_sync_per_batch(data_root):
    from lsuv_pipeline.data import DatasetSpec, open_source
    from lsuv_pipeline.executors import loaded
    from lsuv_pipeline.layers import trace
    from lsuv_pipeline.models import mj
    from lsuv_pipeline.shard import PassPlan, measure_shard

    device = torch.device("cuda")
    spec = DatasetSpec(name="mnist", root=str(data_root), limit=2000, download=False)
    source = open_source(spec).set_loader_workers(2)
    model = mj().to(device)
    layers = tuple(trace(model, source.batch(0, 2).to(device)))
    plan = PassPlan(layers, None, 250)
    (shard,) = source.shards(2000)
    seen = []

    def strict(batches):  # the batch loop runs in "error" mode, the shard's end does not
        torch.cuda.set_sync_debug_mode("error")
        try:
            for x in batches:
                seen.append(x.is_pinned())
                yield x
        finally:
            torch.cuda.set_sync_debug_mode("default")

    batches = strict(loaded(source, shard, 250, device))
    measured = measure_shard(model, batches, plan, device=device)
    assert seen == [True] * 8 and set(measured) == {i.name for i in layers}
