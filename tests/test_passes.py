"""One pass: resume from the per-shard record, run the shards, merge in shard order."""

import pytest
import torch
from torch import nn

from lsuv_pipeline.data import TensorSource
from lsuv_pipeline.errors import DataError, Interrupted
from lsuv_pipeline.executors import Executor, InlineExecutor
from lsuv_pipeline.layers import trace
from lsuv_pipeline.passes import PassContext, run_pass
from lsuv_pipeline.progress import Progress
from lsuv_pipeline.shard import PassPlan
from lsuv_pipeline.store import RunStore


def source(n=600, offset=0.0):
    gen = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (n, 1, 8, 8), generator=gen, dtype=torch.uint8)
    return TensorSource(name="toy", split="train", images=images, mean=(offset,), std=(1.0,))


def model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(144, 5))


class Reversed(Executor):
    """Runs the shards inline but hands them back last first, counting what it ran."""

    def __init__(self, fail_after=None):
        self.inner, self.ran, self.fail_after = InlineExecutor(), [], fail_after

    def run_pass(self, model, source, shards, plan, *, device, on_batch=None):
        done = list(self.inner.run_pass(model, source, shards, plan, device=device))
        for shard, moments in reversed(done):
            if self.fail_after is not None and len(self.ran) == self.fail_after:
                raise RuntimeError("the machine went away")
            self.ran.append(shard.index)
            yield shard, moments


def measure(executor, m, src, record=None, progress=None):
    plan = PassPlan(tuple(trace(m, src.batch(0, 2))), None, 50)
    ctx = PassContext(executor, m, torch.device("cpu"), 100, progress or Progress())
    return run_pass(ctx, src, plan, label="pass", record=record)


def same(a, b):
    return a.keys() == b.keys() and all(
        torch.equal(x.mean, y.mean) and torch.equal(x.m2, y.m2) and x.count == y.count
        for k in a
        for x, y in zip(a[k], b[k], strict=True)
    )


def test_the_merge_is_in_shard_order_whatever_order_shards_finish_in():
    m, src = model(), source()
    inline = measure(InlineExecutor(), m, src)
    assert same(measure(Reversed(), m, src), inline)


def test_a_pass_resumes_from_its_record_and_computes_only_the_missing_shards(tmp_path):
    m, src = model(), source()
    store = RunStore.create(tmp_path / "r.zarr", {})
    with pytest.raises(RuntimeError):
        measure(Reversed(fail_after=2), m, src, record=(store, "layer/x/1"))
    again = Reversed()
    resumed = measure(again, m, src, record=(store, "layer/x/1"))
    assert sorted(again.ran) == [0, 1, 2, 3]  # shards 5 and 4 were recorded
    assert same(resumed, measure(InlineExecutor(), m, src))


def test_non_finite_outputs_stop_the_pass_naming_the_samples():
    src = source()
    m = model()
    with torch.no_grad():
        m[0].weight[0, 0, 0, 0] = float("inf")
    with pytest.raises(DataError, match=r"split 'train' of 'toy', samples 0..99: layer '0'"):
        measure(InlineExecutor(), m, src)


class StopAt(Progress):
    """Asks the pass to stop (as Ctrl-C does) when ``n`` samples are done."""

    def __init__(self, ctx_holder, n):
        self.holder, self.n, self.seen = ctx_holder, n, 0

    def advance(self, n):
        self.seen += n
        if self.seen >= self.n:
            self.holder[0].stop.requested = True


def test_a_stop_request_ends_the_pass_after_the_batch_in_flight(tmp_path):
    m, src = model(), source()
    store = RunStore.create(tmp_path / "r.zarr", {})
    holder = []
    progress = StopAt(holder, 250)
    plan = PassPlan(tuple(trace(m, src.batch(0, 2))), None, 50)
    ctx = PassContext(InlineExecutor(), m, torch.device("cpu"), 100, progress)
    holder.append(ctx)
    with pytest.raises(Interrupted, match="pass"):
        run_pass(ctx, src, plan, label="pass", record=(store, "p"))
    assert progress.seen == 250  # five batches of 50: the one in flight finished, no more
    partial = store.partial("p", 6, [(i.name, i.calls, i.channels) for i in plan.layers])
    assert sorted(partial.done()) == [0, 1]  # the finished shards are kept


class Watching(Executor):
    """Runs the shards inline; as each one after the first starts, notes whether the record
    of the shard before it was still unwritten (and that of the one before that written),
    and lets that record's write go on."""

    def __init__(self, started, written):
        self.inner, self.started, self.written = InlineExecutor(), started, written
        self.pending, self.before = [], []

    def run_pass(self, model, source, shards, plan, *, device, on_batch=None):
        for i, shard in enumerate(shards):
            if i:
                self.pending.append(i - 1 not in self.written)
            if i > 1:
                self.before.append(i - 2 in self.written)  # one record in flight at most
            self.started[i].set()
            yield from self.inner.run_pass(model, source, [shard], plan, device=device)
        self.started[len(shards)].set()


def test_a_shards_record_is_written_while_the_next_shard_computes(tmp_path, monkeypatch):
    import threading

    from lsuv_pipeline.partial import Partial

    started, written, write = [threading.Event() for _ in range(7)], set(), Partial._write

    def held(self, index, rows):  # a record's write waits until the next shard has started
        started[index + 1].wait(timeout=5)
        write(self, index, rows)
        written.add(index)

    monkeypatch.setattr(Partial, "_write", held)
    m, src = model(), source()
    store = RunStore.create(tmp_path / "r.zarr", {})
    watching = Watching(started, written)
    recorded = measure(watching, m, src, record=(store, "p"))
    assert watching.pending == [True] * 5
    assert watching.before == [True] * 4
    assert written == set(range(6))  # every record was written by return
    assert same(recorded, measure(InlineExecutor(), m, src))
    plan = PassPlan(tuple(trace(m, src.batch(0, 2))), None, 50)
    partial = store.partial("p", 6, [(i.name, i.calls, i.channels) for i in plan.layers])
    assert sorted(partial.done()) == list(range(6))


def test_a_record_that_cannot_be_written_stops_the_pass_with_one_store_error(tmp_path, monkeypatch):
    import errno

    from lsuv_pipeline.errors import StoreError
    from lsuv_pipeline.partial import Partial

    write, ran = Partial._write, []

    def full(self, index, rows):
        ran.append(index)
        if index == 2:
            with self._writing(f"the record of shard {index}"):
                raise OSError(errno.ENOSPC, "No space left on device")
        write(self, index, rows)

    monkeypatch.setattr(Partial, "_write", full)
    m, src = model(), source()
    store = RunStore.create(tmp_path / "r.zarr", {})
    with pytest.raises(
        StoreError, match=r"no space left on the device .* while writing the record of shard 2"
    ):
        measure(InlineExecutor(), m, src, record=(store, "p"))
    assert 2 in ran
