"""LSUV for attention: query / key / value / output projections solved like any Linear."""

import contextlib

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from lsuv_pipeline import RunConfig, compute
from lsuv_pipeline.attention import attention_layers, functional_calls, get_layer
from lsuv_pipeline.layers import plan_layers, trace

CONFIGS = [
    {},
    {"kdim": 6, "vdim": 5},
    {"add_bias_kv": True, "add_zero_attn": True},
    {"bias": False},
]


@pytest.mark.parametrize("kwargs", CONFIGS)
@pytest.mark.parametrize("call", ["self", "cross", "masked", "weights"])
def test_routed_attention_is_the_same_function_and_runs_each_projection(kwargs, call):
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(8, 2, batch_first=True, **kwargs).eval()
    x = torch.randn(3, 5, 8)
    k = torch.randn(3, 4, kwargs.get("kdim", 8))
    v = torch.randn(3, 4, kwargs.get("vdim", 8))
    if call == "self" and "kdim" not in kwargs:
        args, extra = (x, x, x), {"need_weights": False}
    else:
        args, extra = (x, k, v), {"need_weights": call == "weights"}
    if call == "masked":
        extra["key_padding_mask"] = torch.tensor([[False, False, True, True]] * 3)
    with torch.no_grad():
        plain, plain_weights = mha(*args, **extra)
        seen = []
        hooks = [
            m.register_forward_hook(lambda m, i, o, n=n: seen.append(n))
            for m, n in {**attention_layers(mha), mha.out_proj: "out_proj"}.items()
        ]
        try:
            with functional_calls(mha):
                routed, weights = mha(*args, **extra)
        finally:
            for h in hooks:
                h.remove()
    assert seen == ["q_proj", "k_proj", "v_proj", "out_proj"]
    torch.testing.assert_close(routed, plain, rtol=0, atol=1e-6)
    if plain_weights is not None:
        torch.testing.assert_close(weights, plain_weights, rtol=0, atol=1e-6)


class Encoder(nn.Module):
    """Patch embedding, two pre-norm transformer layers, mean pool, linear head."""

    def __init__(self, causal: bool = False):
        super().__init__()
        self.causal = causal
        self.patch = nn.Conv2d(1, 16, 4, stride=4)
        layer = nn.TransformerEncoderLayer(16, 4, 32, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = nn.Linear(16, 10)

    def forward(self, x):
        t = self.patch(x).flatten(2).transpose(1, 2)
        mask = nn.Transformer.generate_square_subsequent_mask(t.shape[1]) if self.causal else None
        return self.head(self.encoder(t, mask=mask, is_causal=self.causal).mean(1))


PROJ = ("q_proj", "k_proj", "v_proj")


def _independent(model, x):
    """Float64 moments of every attention projection and every module layer, with hooks
    written here: each projection recomputed from the attention module's own inputs."""
    model = model.double().eval()
    seen: dict[str, list[torch.Tensor]] = {}

    def pre(name, mha):
        def hook(module, args, kwargs):
            q, k, v = (*args, kwargs.get("key"), kwargs.get("value"))[:3]
            e = mha.embed_dim
            rows = [slice(i * e, (i + 1) * e) for i in range(3)]
            for leaf, inp, r in zip(PROJ, (q, k, v), rows, strict=True):
                y = F.linear(inp, mha.in_proj_weight[r], mha.in_proj_bias[r])
                seen.setdefault(f"{name}.{leaf}", []).append(y)

        return hook

    handles = []
    for name, m in model.named_modules():
        if isinstance(m, nn.MultiheadAttention):
            handles.append(m.register_forward_pre_hook(pre(name, m), with_kwargs=True))
            out = f"{name}.out_proj"
            handles.append(m.register_forward_hook(
                lambda m, i, o, n=out: seen.setdefault(n, []).append(o[0])))  # fmt: skip
        elif isinstance(m, (nn.Conv2d, nn.Linear)) and not name.endswith("out_proj"):
            handles.append(m.register_forward_hook(
                lambda m, i, o, n=name: seen.setdefault(n, []).append(o)))  # fmt: skip
    fast = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)  # the fused path skips the hooks
    try:
        with torch.no_grad():
            model(x.double())
    finally:
        torch.backends.mha.set_fastpath_enabled(fast)
        for h in handles:
            h.remove()
    return {n: torch.cat([t.flatten() for t in ts]) for n, ts in seen.items()}


def _data(n=192, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 1, 16, 16, generator=g) * 2 + 0.5


@pytest.mark.parametrize("causal", [False, True])
def test_attention_projections_are_solved_exactly(tmp_path, causal):
    torch.manual_seed(0)
    model = Encoder(causal)
    x = _data()
    cfg = RunConfig(dataset="noise", shard_size=64, batch_size=32)
    result = compute(cfg, tmp_path / "a.zarr", model=model, data=torch.utils.data.TensorDataset(x),
                     device="cpu", progress=False)  # fmt: skip
    names = [s.name for s in result.solved]
    for i in range(2):
        for leaf in (*PROJ, "out_proj"):
            assert f"encoder.layers.{i}.self_attn.{leaf}" in names
    assert [s.name for s in result.layers if s.reason] == []  # nothing left
    outputs = _independent(result.model, x)
    assert set(outputs) == set(names)
    for name, y in outputs.items():
        assert abs(y.mean().item()) < 1e-5, name
        assert abs(y.std(correction=0).item() - 1) < 1e-5, name


def test_channel_mode_gives_every_projection_feature_unit_std(tmp_path):
    torch.manual_seed(1)
    model = Encoder()
    x = _data(128, seed=1)
    cfg = RunConfig(dataset="noise", shard_size=64, batch_size=32, mode="channel")
    result = compute(cfg, tmp_path / "c.zarr", model=model, data=torch.utils.data.TensorDataset(x),
                     device="cpu", progress=False)  # fmt: skip
    mha = result.model.encoder.layers[1].self_attn.double()
    seen = []
    hook = mha.register_forward_pre_hook(lambda m, a, k: seen.append(a[0]), with_kwargs=True)
    with contextlib.ExitStack() as stack:
        stack.callback(hook.remove)
        _independent(result.model, x)
    v = get_layer(result.model, "encoder.layers.1.self_attn.v_proj")
    y = F.linear(torch.cat(seen).flatten(0, 1), v.weight, v.bias)  # (tokens, features)
    assert (y.mean(0).abs() < 1e-5).all()
    assert ((y.std(0, correction=0) - 1).abs() < 1e-5).all()


class FunctionalQKV(nn.Module):
    """A block that applies its Linears' weights with F.linear, as torchvision's swin does."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Linear(12, 8)
        self.qkv = nn.Linear(8, 24)
        self.proj = nn.Linear(8, 8)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        x = self.stem(x)
        q, k, v = F.linear(x, self.qkv.weight, self.qkv.bias).unflatten(-1, (3, 8)).unbind(-2)
        a = torch.softmax(q @ k.transpose(-1, -2) / 8**0.5, -1) @ v
        x = x + F.linear(a, self.proj.weight, self.proj.bias)
        return self.head(x.mean(1))


def test_linear_weights_used_functionally_are_solved(tmp_path):
    torch.manual_seed(2)
    model = FunctionalQKV()
    x = torch.randn(96, 5, 12) * 3
    cfg = RunConfig(dataset="noise", shard_size=48, batch_size=16)
    result = compute(cfg, tmp_path / "f.zarr", model=model, data=torch.utils.data.TensorDataset(x),
                     device="cpu", progress=False)  # fmt: skip
    assert [s.name for s in result.solved] == ["stem", "qkv", "proj", "head"]
    m = result.model.double()
    with torch.no_grad():
        h = m.stem(x.double())
        qkv = F.linear(h, m.qkv.weight, m.qkv.bias)
    for y in (h, qkv):
        assert abs(y.mean().item()) < 1e-6 and abs(y.std(correction=0).item() - 1) < 1e-6


def test_unsolvable_attention_weights_are_named():
    torch.manual_seed(3)

    class Two(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.MultiheadAttention(8, 2, batch_first=True, add_bias_kv=True)
            self.b = nn.MultiheadAttention(8, 2, batch_first=True)
            self.b.in_proj_weight = self.a.in_proj_weight  # tied across layers
            self.head = nn.Linear(8, 2)

        def forward(self, x):
            x = self.a(x, x, x)[0]
            return self.head(self.b(x, x, x)[0].mean(1))

    model = Two()
    traced = trace(model, torch.randn(2, 4, 8))
    plan = plan_layers(model, traced)
    reasons = {u.name: u.reason for u in plan.unsolved}
    assert "bias_k / bias_v" in reasons["a"]
    for leaf in PROJ:
        assert "tied to" in reasons[f"a.{leaf}"] and "tied to" in reasons[f"b.{leaf}"]
    assert {i.name for i in plan.layers} == {"a.out_proj", "b.out_proj", "head"}
