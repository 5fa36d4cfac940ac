import pytest
import torch
from torch import nn
from torch.nn import functional as F

from lsuv_pipeline.errors import ModelError
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


class InplaceRelu(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 3, 3)
        self.act = nn.ReLU(inplace=True)
        self.fc = nn.Linear(3, 2, bias=False)

    def forward(self, x):
        return self.fc(self.act(self.conv(x)).mean((2, 3)))


def test_linear_without_bias_is_a_target():
    layers = trace(InplaceRelu(), torch.randn(2, 1, 7, 7))
    assert [i.name for i in layers] == ["conv", "fc"]


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
