import pytest
import torch
from torch import nn
from torch.nn import functional as F

from lsuv_pipeline import moments as mom
from lsuv_pipeline.errors import ModelError
from lsuv_pipeline.hooks import capture, evaluating
from lsuv_pipeline.layers import trace


class Reordered(nn.Module):
    """Registered head first, run stem first."""

    def __init__(self):
        super().__init__()
        self.head = nn.Linear(8, 3)
        self.mid = nn.Conv2d(4, 8, 3)
        self.stem = nn.Conv2d(1, 4, 3)

    def forward(self, x):
        x = F.relu(self.stem(x))
        x = F.relu(self.mid(x))
        return self.head(x.mean((2, 3)))


def test_forward_order_not_registration_order():
    layers = trace(Reordered(), torch.randn(2, 1, 9, 9))
    assert [i.name for i in layers] == ["stem", "mid", "head"]
    assert [i.kind for i in layers] == ["Conv2d", "Conv2d", "Linear"]
    assert [i.channels for i in layers] == [4, 8, 3]


class SharedInSequence(nn.Module):
    """The same conv applied twice in a row."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(1, 4, 3, padding=1)
        self.shared = nn.Conv2d(4, 4, 3, padding=1)

    def forward(self, x):
        x = F.relu(self.stem(x))
        return self.shared(F.relu(self.shared(x)))


class SharedInParallel(nn.Module):
    """The same conv applied to two inputs that do not depend on it."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(1, 4, 3, padding=1)
        self.b = nn.Conv2d(1, 4, 3, padding=1)
        self.shared = nn.Conv2d(4, 4, 3, padding=1)

    def forward(self, x):
        return self.shared(F.relu(self.a(x))) + self.shared(F.relu(self.b(x)))


def test_a_module_used_twice_is_counted_and_its_dependence_found():
    seq = {i.name: i for i in trace(SharedInSequence(), torch.randn(2, 1, 6, 6))}
    assert seq["shared"].calls == 2 and seq["shared"].dependent
    assert seq["stem"].calls == 1 and not seq["stem"].dependent
    par = {i.name: i for i in trace(SharedInParallel(), torch.randn(2, 1, 6, 6))}
    assert par["shared"].calls == 2 and not par["shared"].dependent


def test_capture_pools_every_call_of_a_shared_module():
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


class InplaceRelu(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 3, 3)
        self.act = nn.ReLU(inplace=True)
        self.fc = nn.Linear(3, 2, bias=False)

    def forward(self, x):
        return self.fc(self.act(self.conv(x)).mean((2, 3)))


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


def test_linear_without_bias_is_a_target():
    layers = trace(InplaceRelu(), torch.randn(2, 1, 7, 7))
    assert [i.name for i in layers] == ["conv", "fc"]


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


def test_trace_leaves_the_model_as_it_was():
    model = Reordered().train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    trace(model, torch.randn(2, 1, 9, 9))
    assert model.training
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not model.stem._forward_hooks


def test_model_without_targets_or_rejecting_the_input_is_a_clear_error():
    with pytest.raises(ModelError, match="no conv or linear layer"):
        trace(nn.Sequential(nn.ReLU()), torch.randn(2, 3))
    with pytest.raises(ModelError, match=r"failed on an input batch of shape \(2, 1, 9, 9\)"):
        trace(nn.Linear(5, 2), torch.randn(2, 1, 9, 9))
