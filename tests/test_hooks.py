"""Hooks on target layers: moments per call, taken before in-place ops; early exit."""

import torch
from torch import nn
from torch.nn import functional as F

from lsuv_pipeline import moments as mom
from lsuv_pipeline.hooks import capture, evaluating, in_model_dtype
from lsuv_pipeline.layers import trace
from tests.test_layers import InplaceRelu, Reordered, SharedInParallel


def test_capture_keeps_each_call_of_a_shared_module_and_they_pool_to_one_pass():
    model = SharedInParallel()
    layers = trace(model, torch.randn(2, 1, 6, 6))
    shared = next(i for i in layers if i.name == "shared")
    x = torch.randn(5, 1, 6, 6)
    with torch.no_grad(), capture(model, [shared], stop_after=shared) as cap:
        cap.forward(x)
    with torch.no_grad():
        y1 = model.shared(F.relu(model.a(x)))
        y2 = model.shared(F.relu(model.b(x)))
    calls = cap.moments["shared"]
    assert len(calls) == 2
    ref = mom.from_batch(torch.cat([y1, y2]))
    pooled = mom.merge_all(calls)
    assert pooled.count == ref.count
    assert torch.allclose(pooled.mean, ref.mean) and torch.allclose(pooled.var, ref.var)


def test_in_place_relu_after_a_conv_does_not_corrupt_its_moments():
    model = InplaceRelu()
    layers = trace(model, torch.randn(2, 1, 7, 7))
    x = torch.randn(16, 1, 7, 7)
    with torch.no_grad():
        ref = mom.from_batch(model.conv(x))
    assert ref.mean.min() < 0  # the raw output has negative values, which ReLU would zero
    with torch.inference_mode(), capture(model, layers) as cap:
        cap.forward(x)
    (got,) = cap.moments["conv"]
    assert torch.allclose(got.mean, ref.mean) and torch.allclose(got.var, ref.var)


def test_early_exit_never_runs_later_layers():
    model = Reordered()
    layers = trace(model, torch.randn(2, 1, 9, 9))
    ran = []
    handle = model.head.register_forward_pre_hook(lambda m, i: ran.append("head"))
    try:
        with torch.inference_mode(), capture(model, layers[:1], stop_after=layers[0]) as cap:
            cap.forward(torch.randn(4, 1, 9, 9))
        assert ran == [] and list(cap.moments) == ["stem"]
        with torch.inference_mode(), capture(model, layers, stop_after=None) as cap:
            cap.forward(torch.randn(4, 1, 9, 9))
        assert ran == ["head"]
    finally:
        handle.remove()
    assert not model.stem._forward_hooks  # capture removed its hooks


def test_evaluating_restores_each_modules_own_mode():
    model = nn.Sequential(nn.Linear(2, 2), nn.Dropout(), nn.BatchNorm1d(2))
    model.train()
    model[1].eval()
    with evaluating(model):
        assert not any(m.training for m in model.modules())
    assert [m.training for m in model] == [True, False, True]


def test_a_floating_input_takes_the_models_dtype_and_token_ids_stay_integers():
    model = nn.Sequential(nn.Embedding(4, 3), nn.Linear(3, 2)).to(torch.bfloat16)
    assert in_model_dtype(torch.ones(2, 3), model).dtype == torch.bfloat16
    ids = torch.tensor([[0, 3]])
    assert in_model_dtype(ids, model) is ids
    plain = torch.ones(2, 3)
    assert in_model_dtype(plain, nn.Linear(3, 2)) is plain  # already the model's dtype
    assert in_model_dtype(plain, nn.ReLU()) is plain  # no parameter to follow
