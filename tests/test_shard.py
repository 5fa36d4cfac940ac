"""What one shard computes: the same moments from the input or from the cache."""

import torch
from torch import nn

from lsuv_pipeline.data import Shard, TensorSource
from lsuv_pipeline.layers import trace
from lsuv_pipeline.shard import CachedRunner, CachePlan, PassPlan, measure_shard
from lsuv_pipeline.solve import solve


def toy():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 3), nn.Flatten(), nn.Linear(64, 3)
    )
    images = torch.randint(
        0, 256, (200, 1, 8, 8), generator=torch.Generator().manual_seed(1), dtype=torch.uint8
    )
    return model, TensorSource(name="toy", split="train", images=images, mean=(0.0,), std=(1.0,))


def test_a_cached_pass_measures_what_a_pass_from_the_input_does():
    model, src = toy()
    layers = tuple(trace(model, src.batch(0, 2)))
    shard = Shard(0, 0, 200)
    runner = CachedRunner()
    cpu = torch.device("cpu")
    solved = ()  # the layers before k, solved as a run solves them
    for k, info in enumerate(layers):
        plain = measure_shard(
            model, src.batches(shard, 50), PassPlan((info,), info, 50, solved=solved), device=cpu
        )
        cache = CachePlan("run-1", layers, k, 1 << 30)
        plan = PassPlan((info,), info, 50, solved=solved, cache=cache)
        cached = runner.measure(model, lambda: src.batches(shard, 50), shard, plan, cpu, None)
        (a,), (b,) = plain[info.name], cached[info.name]
        assert torch.equal(a.mean, b.mean) and torch.equal(a.m2, b.m2), info.name
        solved += (
            (info.name, solve(a, layer=info.name, mode="tensor", target_std=1.0, has_bias=True)),
        )


def test_another_run_gets_new_segments_even_for_the_same_model_object():
    model, src = toy()
    layers = tuple(trace(model, src.batch(0, 2)))
    shard, cpu = Shard(0, 0, 200), torch.device("cpu")
    runner = CachedRunner()
    plan = PassPlan((layers[0],), layers[0], 50, cache=CachePlan("run-1", layers, 0, 1 << 30))
    runner.measure(model, lambda: src.batches(shard, 50), shard, plan, cpu, None)
    first = runner.segments
    runner.measure(model, lambda: src.batches(shard, 50), shard, plan, cpu, None)
    assert runner.segments is first  # the same run: traced once
    again = PassPlan((layers[0],), layers[0], 50, cache=CachePlan("run-2", layers, 0, 1 << 30))
    runner.measure(model, lambda: src.batches(shard, 50), shard, again, cpu, None)
    assert runner.segments is not first
