import pytest
import torch
from torch import nn
from torch.nn import functional as F

from lsuv_pipeline.coverage import weights_not_solved
from lsuv_pipeline.errors import ModelError
from lsuv_pipeline.layers import plan_layers, trace


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


class Zoo(nn.Module):
    """Weights of every kind the solve does not reach, around two solvable layers."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(1, 8, 3)
        self.norm = nn.BatchNorm2d(8)
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
        self.token = nn.Parameter(torch.zeros(1, 1, 8))  # on the model itself
        self.rnn = nn.LSTM(8, 8)
        self.embed = nn.Embedding(10, 8)
        self.aux = nn.Linear(8, 10)  # an auxiliary head, used in training only
        self.head = nn.utils.parametrizations.weight_norm(nn.Linear(8, 10))

    def forward(self, x):
        x = self.norm(self.stem(x)).flatten(2).transpose(1, 2)  # (N, L, C)
        x = torch.cat([self.token.expand(x.shape[0], -1, -1), x], 1)
        x, _ = self.attn(x, x, x)
        if self.training:
            return self.aux(x[:, 0])
        return self.head(x[:, 0])


def test_every_weight_the_solve_does_not_reach_is_named_with_its_reason():
    model = Zoo()
    traced = trace(model, torch.randn(2, 1, 8, 8))
    attention = ["attn.q_proj", "attn.k_proj", "attn.v_proj", "attn.out_proj"]
    assert [i.name for i in traced] == ["stem", *attention, "head"]
    assert [i.functional for i in traced] == [False, True, True, True, True, False]
    plan = plan_layers(model, traced)
    reasons = {u.name: u.reason for u in plan.unsolved}
    assert set(reasons) == {"", "rnn", "embed", "aux"}, reasons
    assert "recurrent" in reasons["rnn"] and "embedding" in reasons["embed"]
    assert "never reached in an eval-mode forward" in reasons["aux"]
    assert "holds weights but is not a conv / linear layer" in reasons[""]
    assert [i.name for i in plan.layers] == ["stem", *attention, "head"]
    assert (
        weights_not_solved(model, {i.name for i in traced})[0][0] == ""
    )  # registration order, norms left out
