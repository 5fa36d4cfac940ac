import random

import numpy as np
import pytest
import torch

from lsuv_pipeline import moments as mom


def two_pass(x: np.ndarray, axis=(0, 2, 3)):
    """Reference: numpy float64 two-pass mean and population variance per channel."""
    x = x.astype(np.float64)
    mean = x.mean(axis=axis, keepdims=True)
    var = ((x - mean) ** 2).mean(axis=axis)
    return mean.squeeze(), var


def close(a, b, rel):
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return np.all(np.abs(a - b) <= rel * np.maximum(np.abs(b), 1e-300))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_from_batch_equals_numpy_two_pass(dtype):
    x = torch.randn(64, 5, 7, 7, dtype=dtype) * 3 + 2
    m = mom.from_batch(x)
    mean, var = two_pass(x.numpy())
    rel = 1e-5 if dtype == torch.float32 else 1e-12
    assert m.count == 64 * 49
    assert close(m.mean, mean, rel) and close(m.var, var, rel)


def test_float32_offset_and_memory_layout_keep_the_variance():
    # the CPU reduction is centred (shifted rows, or two passes for other layouts): an offset
    # of 1000 std in float32 costs only rounding, and a channels-last or transposed layout
    # reduces to the same numbers
    x = torch.randn(32, 6, 9, 9) + 1000
    m = mom.from_batch(x)
    mean, var = two_pass(x.numpy())
    assert close(m.mean, mean, 1e-6) and close(m.var, var, 1e-3)
    last = mom.from_batch(x.to(memory_format=torch.channels_last))
    assert close(last.mean, m.mean, 1e-6) and close(last.var, m.var, 1e-5)
    linear = mom.from_batch(x.movedim(1, -1), channel_dim=-1)  # not contiguous
    assert close(linear.mean, m.mean, 1e-6) and close(linear.var, m.var, 1e-5)


def test_data_offset_by_1e8_keeps_the_variance():
    x = torch.rand(32, 3, 8, 8, dtype=torch.float64) + 1e8
    parts = torch.split(x, 5)
    m = mom.merge_all(mom.from_batch(p) for p in parts)
    mean, var = two_pass(x.numpy())
    assert close(m.mean, mean, 1e-15)
    assert close(m.var, var, 1e-7)  # E[x^2] - E[x]^2 would give garbage (or negatives) here


def test_conv_rows_in_float32_are_accurate_to_a_few_ulps():
    # a conv-shaped batch takes the row path: per-row float32 sums of shifted values,
    # combined in float64; against a float64 reference over the same float32 values
    g = torch.Generator().manual_seed(0)
    x = torch.randn(128, 8, 19, 19, generator=g) * 3 + 30
    x[:, 2] = x[:, 2].relu()  # a post-ReLU-like channel: many exact zeros
    m = mom.from_batch(x)
    mean, var = two_pass(x.numpy())
    assert np.abs(m.mean.numpy() - mean).max() <= 1e-6 * np.sqrt(var).max()
    assert close(m.var, var, 5e-7)


def test_constant_channels_have_zero_variance():
    x = torch.randn(16, 3, 4, 4)
    x[:, 1] = 7.25
    for layout in (x, x.to(memory_format=torch.channels_last)):  # rows, and two passes
        m = mom.merge_all(mom.from_batch(p) for p in torch.split(layout, 3))
        assert m.var[1].item() == 0.0
        assert m.mean[1].item() == 7.25
        assert (m.var[[0, 2]] > 0).all()


def test_linear_outputs_use_the_last_dim_as_channels():
    x = torch.randn(10, 4, 6, dtype=torch.float64)  # (N, L, features)
    m = mom.from_batch(x, channel_dim=-1)
    flat = x.reshape(-1, 6).numpy()
    assert m.count == 40
    assert close(m.mean, flat.mean(0), 1e-12) and close(m.var, flat.var(0), 1e-12)


def test_merge_of_any_split_in_any_grouping_equals_one_pass():
    rng = random.Random(0)
    x = torch.randn(200, 4, 3, 3, dtype=torch.float64) * 5 - 3
    whole = mom.from_batch(x)
    for _ in range(20):
        cuts = sorted(rng.sample(range(1, 200), rng.randint(1, 12)))
        parts = [mom.from_batch(p) for p in torch.tensor_split(x, cuts)]
        rng.shuffle(parts)  # any order
        # any grouping: fold random adjacent pairs until one is left
        while len(parts) > 1:
            i = rng.randrange(len(parts) - 1)
            parts[i : i + 2] = [mom.merge(parts[i], parts[i + 1])]
        m = parts[0]
        assert m.count == whole.count
        assert close(m.mean, whole.mean, 1e-12)
        assert close(m.m2, whole.m2, 1e-12)


def test_empty_is_the_identity_of_merge():
    a = mom.from_batch(torch.randn(8, 3, 2, 2))
    for m in (mom.merge(mom.Moments.empty(), a), mom.merge(a, mom.Moments.empty())):
        assert m.count == a.count
        assert torch.equal(m.mean, a.mean) and torch.equal(m.m2, a.m2)
    assert mom.merge_all([]).count == 0
    assert mom.from_batch(torch.empty(0, 3, 2, 2)).count == 0


def test_fixed_merge_order_is_bitwise_reproducible():
    x = torch.randn(100, 6, 5, 5)
    runs = []
    for _ in range(2):
        runs.append(mom.merge_all(mom.from_batch(p) for p in torch.split(x, 7)))
    assert torch.equal(runs[0].mean, runs[1].mean) and torch.equal(runs[0].m2, runs[1].m2)


def test_reduce_channels_equals_one_pass_over_everything():
    x = torch.randn(30, 5, 4, 4, dtype=torch.float64) + torch.arange(5.0).view(1, 5, 1, 1)
    t = mom.reduce_channels(mom.merge_all(mom.from_batch(p) for p in torch.split(x, 4)))
    flat = x.numpy().ravel()
    assert t.count == flat.size
    assert close(t.mean, flat.mean(), 1e-12) and close(t.var, flat.var(), 1e-12)


def _largest_buffer_freed(fn) -> int:
    """Bytes of the largest CPU buffer that ``fn`` allocated and freed (the profiler records
    every free with its size)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    return max((-e.cpu_memory_usage for e in prof.events() if e.name == "[memory]"), default=0)


def test_conv_rows_need_no_temporary_the_size_of_the_batch():
    # the shifted rows are made a few samples at a time, in a buffer that stays in the
    # core's cache: the batch is read once from memory and nothing its size is written
    # (the bits are those of shifting the whole batch at once)
    x = torch.randn(256, 32, 19, 19) * 3 + 30  # 11.8 MB
    assert _largest_buffer_freed(lambda: mom.from_batch(x)) <= 1 << 20  # 1 MiB
    rows = x.view(256, 32, -1)
    shifted = rows - rows[:, :, :1]
    s = shifted.sum(dim=2).double()
    q = torch.linalg.vector_norm(shifted, dim=2).double().square()
    row_mean = s / 361
    row_m2 = (q - s * row_mean).clamp_(min=0.0)
    row_mean += rows[:, :, 0].double()
    mean = row_mean.mean(dim=0)
    m2 = row_m2.sum(dim=0) + 361 * (row_mean - mean).square().sum(dim=0)
    got = mom.from_batch(x)
    assert torch.equal(got.mean, mean) and torch.equal(got.m2, m2)
