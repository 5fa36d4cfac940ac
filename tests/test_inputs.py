"""Inputs other than one float tensor: token ids, dict batches, a forward_fn, optional
forward arguments."""

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from lsuv_pipeline import RunConfig, compute
from lsuv_pipeline.cache import Segments
from lsuv_pipeline.errors import ConfigError, ModelError
from lsuv_pipeline.layers import trace

CFG = dict(dataset="tokens", shard_size=64, batch_size=16)


class TokenModel(nn.Module):
    """Embedding, a causal transformer layer, an LM head; ids as ``input_ids``."""

    def __init__(self, vocab=32, width=16):
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.block = nn.TransformerEncoderLayer(width, 2, 32, dropout=0.0, batch_first=True)
        self.head = nn.Linear(width, vocab)

    def forward(self, input_ids, attention_mask=None):
        x = self.embed(input_ids)
        n = x.shape[1]
        mask = torch.ones(n, n, dtype=torch.bool).triu(1)  # True: not attended
        pad = None if attention_mask is None else ~attention_mask.bool()
        return self.head(self.block(x, src_mask=mask, is_causal=True, src_key_padding_mask=pad))


def _ids(n=128, length=12, vocab=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (n, length), generator=g)


def _independent_std(model, batch_kwargs, name):
    """Float64 output of one module layer over the batches, with a hook written here."""
    model = model.double().eval()
    seen = []
    hook = model.get_submodule(name).register_forward_hook(lambda m, i, o: seen.append(o))
    fast = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with torch.no_grad():
            for kwargs in batch_kwargs:
                model(**kwargs)
    finally:
        torch.backends.mha.set_fastpath_enabled(fast)
        hook.remove()
    y = torch.cat([t.flatten() for t in seen])
    return y.mean().item(), y.std(correction=0).item()


def test_integer_token_ids_are_taken_as_they_are(tmp_path):
    torch.manual_seed(0)
    ids = _ids()
    result = compute(RunConfig(**CFG), tmp_path / "t.zarr", model=TokenModel(),
                     data=TensorDataset(ids), device="cpu", progress=False)  # fmt: skip
    names = [s.name for s in result.solved]
    assert names[-1] == "head" and "block.self_attn.q_proj" in names
    assert [s.name for s in result.layers if s.reason] == ["embed"]  # named, with its reason
    mean, std = _independent_std(result.model, [{"input_ids": ids}], "block.linear2")
    assert abs(mean) < 1e-5 and abs(std - 1) < 1e-5


class Records(torch.utils.data.Dataset):
    def __init__(self, ids):
        self.ids = ids

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "attention_mask": torch.ones_like(self.ids[i])}


def test_dict_batches_are_given_as_keyword_arguments(tmp_path):
    torch.manual_seed(1)
    ids = _ids(96, seed=1)
    result = compute(RunConfig(**CFG), tmp_path / "d.zarr", model=TokenModel(),
                     data=Records(ids), device="cpu", progress=False)  # fmt: skip
    mask = torch.ones_like(ids)
    mean, std = _independent_std(result.model, [{"input_ids": ids, "attention_mask": mask}], "head")
    assert abs(mean) < 1e-5 and abs(std - 1) < 1e-5


class Padded(Records):
    """Sequences of different lengths, padded with id 0 after their end."""

    def __getitem__(self, i):
        n = 4 + i % 8
        ids = self.ids[i].clone()
        ids[n:] = 0
        return {"input_ids": ids, "attention_mask": torch.arange(len(ids)) < n}


def test_padded_positions_are_left_out_of_the_statistics_through_a_mask(tmp_path):
    torch.manual_seed(4)
    data = Padded(_ids(96, seed=4))
    result = compute(RunConfig(**CFG), tmp_path / "m.zarr", model=TokenModel(), data=data,
                     mask_fn=lambda b: b["attention_mask"], device="cpu",
                     progress=False)  # fmt: skip
    items = [data[i] for i in range(96)]
    ids = torch.stack([it["input_ids"] for it in items])
    keep = torch.stack([it["attention_mask"] for it in items])
    model = result.model.double().eval()
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=keep)  # the head's output, (N, L, vocab)
    counted, padded = out[keep], out[~keep]
    assert abs(counted.mean().item()) < 1e-5 and abs(counted.std(correction=0).item() - 1) < 1e-5
    everything = out.flatten()
    assert abs(everything.std(correction=0).item() - 1) > 1e-3  # with the padding: off target
    assert padded.numel() > 0
    with pytest.raises(ConfigError, match=r"mask_fn must return a \(16, positions\) tensor"):
        compute(RunConfig(**CFG), tmp_path / "bad.zarr", model=TokenModel(), data=data,
                mask_fn=lambda b: b["attention_mask"][0], device="cpu")  # fmt: skip


def test_a_forward_fn_gets_each_batch_whole(tmp_path):
    torch.manual_seed(2)
    ids = _ids(64, seed=2)
    labels = torch.arange(64)
    seen = []

    def forward_fn(model, batch):
        x, y = batch  # the whole (x, y) pair, labels included
        seen.append(y)
        return model(input_ids=x)

    result = compute(RunConfig(**CFG), tmp_path / "f.zarr", model=TokenModel(),
                     data=TensorDataset(ids, labels), forward_fn=forward_fn, device="cpu",
                     progress=False)  # fmt: skip
    assert seen and all(y.dtype == torch.int64 for y in seen)
    assert "test_inputs" in result_provenance(result)
    mean, std = _independent_std(result.model, [{"input_ids": ids}], "head")
    assert abs(mean) < 1e-5 and abs(std - 1) < 1e-5


def result_provenance(result) -> str:
    import zarr

    return zarr.open_group(str(result.path), mode="r").attrs["model"]["forward_fn"]


class WithOptions(nn.Module):
    """A forward with optional arguments after the input, like timm's ViT."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(1, 4, 3)
        self.b = nn.Conv2d(4, 4, 3)
        self.head = nn.Linear(4, 3)

    def forward(self, x, mask=None, scale: float = 1.0):
        if mask is not None:
            x = x * mask
        x = torch.relu(self.a(x)) * scale
        return self.head(torch.relu(self.b(x)).mean((2, 3)))


def test_the_activation_cache_takes_a_forward_with_optional_arguments(tmp_path):
    model = WithOptions()
    layers = trace(model, torch.randn(2, 1, 8, 8))
    Segments(model, layers)  # was Uncacheable: "the traced forward takes 3 inputs, not 1"
    x = torch.randn(96, 1, 8, 8)
    cfg = RunConfig(dataset="noise", shard_size=32, batch_size=16)
    torch.manual_seed(3)
    a = compute(cfg, tmp_path / "a.zarr", model=WithOptions(), data=TensorDataset(x),
                device="cpu", progress=False)  # fmt: skip
    torch.manual_seed(3)
    b = compute(cfg, tmp_path / "b.zarr", model=WithOptions(), data=TensorDataset(x),
                device="cpu", progress=False, cache=False)  # fmt: skip
    for (k, va), vb in zip(
        a.model.state_dict().items(), b.model.state_dict().values(), strict=True
    ):
        assert torch.equal(va, vb), k


def test_integer_images_into_a_conv_say_what_to_do(tmp_path):
    images = torch.randint(0, 256, (8, 1, 8, 8), dtype=torch.uint8)
    with pytest.raises(ModelError, match=r"torch.uint8 tensors, passed as they are: images"):
        compute(RunConfig(dataset="raw"), tmp_path / "u.zarr", model=WithOptions(),
                data=TensorDataset(images), device="cpu")  # fmt: skip


class Pooled(nn.Module):
    """Halves the sequence before its second Linear: the token mask no longer fits there."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(32, 8)
        self.a = nn.Linear(8, 8)
        self.b = nn.Linear(8, 4)

    def forward(self, input_ids, attention_mask=None):
        x = self.a(self.embed(input_ids))
        return self.b(x[:, ::2])


def test_a_mask_that_does_not_fit_a_layers_output_is_an_error_naming_the_layer(tmp_path):
    data = Padded(_ids(64, seed=5))
    with pytest.raises(ConfigError, match=r"layer 'b'.*\(16, 6, 4\).*mask.*\(16, 12\)"):
        compute(RunConfig(**CFG), tmp_path / "p.zarr", model=Pooled(), data=data,
                mask_fn=lambda b: b["attention_mask"], device="cpu")  # fmt: skip
