"""The activation cache: the same bytes as running every pass from the input."""

import pytest
import torch
import zarr
from torch import nn
from torch.nn import functional as F

from lsuv_pipeline import RunConfig, compute
from lsuv_pipeline.cache import Segments, Uncacheable, parse_size
from lsuv_pipeline.data import DatasetSpec, open_source, shards
from lsuv_pipeline.executors import InlineExecutor
from lsuv_pipeline.layers import trace
from lsuv_pipeline.models import mj
from lsuv_pipeline.progress import Progress
from lsuv_pipeline.shard import CachePlan, PassPlan, measure_shard
from lsuv_pipeline.solve import Solution
from tests.stores import assert_same_bytes

CONFIG = dict(limit=1200, shard_size=400, batch_size=100, verify=False)


class Block(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.conv1 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.conv2(out)
        out += x  # skip connection: x is live across both convs
        return self.relu(out)


class SkipNet(nn.Module):
    """A small ResNet-style model: stem, two residual blocks, a 1x1 side branch, a head."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(1, 8, 3, stride=2)
        self.block1 = Block(8)
        self.side = nn.Conv2d(8, 8, 1)
        self.block2 = Block(8)
        self.head = nn.Linear(16, 10)

    def forward(self, x):
        x = F.relu(self.stem(x))
        x = self.block1(x)
        y = self.block2(x)
        z = self.side(x)  # registered before block2, runs after it
        return self.head(torch.cat([y.mean((2, 3)), z.mean((2, 3))], 1))


class Branchy(nn.Module):
    """Data-dependent control flow: torch.fx cannot trace it."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(1, 4, 3)
        self.b = nn.Conv2d(4, 4, 3)
        self.fc = nn.Linear(4, 10)

    def forward(self, x):
        x = F.relu(self.a(x))
        if x.mean() > -1:  # always true, but fx cannot know
            x = F.relu(self.b(x))
        return self.fc(x.mean((2, 3)))


class Notes(Progress):
    def __init__(self):
        self.notes = []

    def note(self, text):
        self.notes.append(text)


def run(tmp_path, name, data_root, model=None, **kwargs):
    out = tmp_path / f"{name}.zarr"
    progress = Notes()
    torch.manual_seed(0)
    model = model() if model else None
    compute(RunConfig(**CONFIG), out, model=model, data_root=data_root, device="cpu",
            progress=progress, **kwargs)  # fmt: skip
    return out, progress.notes


@pytest.mark.parametrize("model", [None, SkipNet], ids=["mj", "skip-connections"])
def test_cache_on_and_off_give_the_same_bytes(tmp_path, data_root, model):
    on, notes = run(tmp_path, "on", data_root, model)
    off, _ = run(tmp_path, "off", data_root, model, cache=False)
    assert not any("activation cache off" in n for n in notes)
    assert_same_bytes(on, off)


def test_resnet18_cached_equals_uncached(tmp_path, data_root):
    from lsuv_pipeline.models import ModelSpec, build_model

    def resnet():
        return build_model(ModelSpec(name="resnet18"), seed=0, in_channels=1, num_classes=10)

    cfg = dict(CONFIG, limit=256, shard_size=128, batch_size=64)
    outs = []
    for i, cache in enumerate((True, False)):
        out = tmp_path / f"r{i}.zarr"
        compute(RunConfig(dataset="fashion-mnist", **cfg), out, model=resnet(),
                data_root=data_root, device="cpu", cache=cache)  # fmt: skip
        outs.append(out)
    assert_same_bytes(*outs)


def test_a_model_fx_cannot_trace_falls_back_and_says_so(tmp_path, data_root):
    on, notes = run(tmp_path, "on", data_root, Branchy)
    off, _ = run(tmp_path, "off", data_root, Branchy, cache=False)
    assert sum("activation cache off: torch.fx cannot trace Branchy" in n for n in notes) == 1
    assert_same_bytes(on, off)


def test_a_budget_too_small_still_gives_the_same_bytes(tmp_path, data_root):
    full, _ = run(tmp_path, "full", data_root)
    none, _ = run(tmp_path, "none", data_root, cache_memory=0)
    some, _ = run(tmp_path, "some", data_root, cache_memory="20MB")  # fits some shards
    assert_same_bytes(full, none)
    assert_same_bytes(full, some)


def test_a_cached_pass_computes_only_the_new_layer(data_root):
    """Count convolution calls: from the cut, pass k runs layer k alone."""
    source = open_source(DatasetSpec(name="mnist", root=str(data_root), limit=200))
    model = mj().eval()
    layers = trace(model, source.batch(0, 2))
    calls = {i.name: 0 for i in layers}
    for info in layers:
        model.get_submodule(info.name).register_forward_pre_hook(
            lambda m, a, n=info.name: calls.__setitem__(n, calls[n] + 1)
        )
    executor = InlineExecutor()
    parts = shards(source.count, 100)
    one = Solution(
        scale=torch.tensor(2.0, dtype=torch.float64), shift=torch.zeros((), dtype=torch.float64)
    )
    for k in range(len(layers)):
        cache = CachePlan("t", tuple(layers), k, None)
        solved = tuple((i.name, one) for i in layers[:k])
        plan = PassPlan((layers[k],), layers[k], 50, solved=solved, cache=cache)
        before = dict(calls)
        list(executor.run_pass(model, source, parts, plan, device=torch.device("cpu")))
        ran = {n: calls[n] - before[n] for n in calls}
        assert ran == {i.name: (4 if j == k else 0) for j, i in enumerate(layers)}, (k, ran)


def test_no_host_sync_per_batch(monkeypatch, data_root):
    source = open_source(DatasetSpec(name="mnist", root=str(data_root), limit=400))
    model = mj().eval()
    layers = trace(model, source.batch(0, 2))
    syncs = []
    for name in ("item", "tolist", "cpu", "numpy"):
        original = getattr(torch.Tensor, name)

        def counted(self, *a, _name=name, _original=original, **k):
            syncs.append(_name)
            return _original(self, *a, **k)

        monkeypatch.setattr(torch.Tensor, name, counted)
    (shard,) = shards(400, 400)
    plan = PassPlan(tuple(layers), None, 25)  # 16 batches, every layer measured
    measure_shard(model, source.batches(shard, 25), plan, device=torch.device("cpu"))
    cached = CachePlan("t", tuple(layers), 2, None)
    list(InlineExecutor().run_pass(model, source, [shard], PassPlan((layers[2],), layers[2], 25,
                                                                     cache=cached),
                                   device=torch.device("cpu")))  # fmt: skip
    assert syncs == []


def test_segments_refuse_shared_layers():
    from tests.test_layers import SharedInSequence

    model = SharedInSequence()
    layers = trace(model, torch.randn(2, 1, 6, 6))
    with pytest.raises(Uncacheable, match="runs more than once"):
        Segments(model, layers)


def test_sizes_read_as_dask_reads_them_gb_is_decimal_gib_binary():
    assert parse_size("512MB") == 512_000_000 and parse_size("4GB") == 4_000_000_000
    assert parse_size("512MiB") == 512 << 20 and parse_size("4GiB") == 4 << 30
    assert parse_size("0") == 0 and parse_size("auto") is None and parse_size(123) == 123
    for bad in ("lots", "-1", "-2GB", True):
        with pytest.raises(ValueError, match="not a size"):
            parse_size(bad)


class TrainOnlyBranch(nn.Module):
    """A head that only runs in training mode (like an auxiliary classifier)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3)
        self.aux = nn.Linear(4, 10)
        self.fc = nn.Linear(4, 10)

    def forward(self, x):
        x = F.relu(self.conv(x)).mean((2, 3))
        if self.training:
            return self.fc(x) + self.aux(x)
        return self.fc(x)


def test_the_cache_traces_the_eval_mode_forward(tmp_path, data_root):
    on, notes = run(tmp_path, "on", data_root, TrainOnlyBranch)
    off, _ = run(tmp_path, "off", data_root, TrainOnlyBranch, cache=False)
    assert not any("activation cache off" in n for n in notes)
    assert_same_bytes(on, off)
    assert "aux" not in zarr.open_group(str(on), mode="r")["layers"]


class Residual(nn.Module):
    """Layer ``a``'s output is read again after layer ``b``: it stays in the cut."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(1, 4, 3, padding=1)
        self.b = nn.Conv2d(4, 4, 3, padding=1)
        self.fc = nn.Linear(4, 10)

    def forward(self, x):
        y = self.a(x)
        z = self.b(F.relu(y))
        return self.fc((z + y).mean((2, 3)))


def test_a_cached_pass_maps_the_cut_in_place():
    """The update of layer k-1 is applied to its cached output where it lies: no second
    buffer of the cut's size per batch, and the same values as the out-of-place map."""
    from lsuv_pipeline.solve import output_map, transform_output

    torch.manual_seed(0)
    model = Residual().eval()
    x = torch.randn(3, 1, 8, 8)
    layers = trace(model, x[:2])
    segments = Segments(model, layers)
    cpu = torch.device("cpu")
    sol = Solution(
        scale=torch.tensor(3.0, dtype=torch.float64), shift=torch.tensor(0.5, dtype=torch.float64)
    )
    with torch.inference_mode():
        _, cut = segments.measure(iter([x]), 0, {}, cpu, None, keep=True)
        raw = cut.envs[0]["a"]
        where, expected = raw.data_ptr(), transform_output(raw, output_map(sol, cpu, raw.dtype), 1)
        _, cut = segments.measure(iter([]), 1, {0: sol}, cpu, cut, keep=True)
    mapped = cut.envs[0]["a"]
    assert mapped.data_ptr() == where
    assert torch.equal(mapped, expected)
