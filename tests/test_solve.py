import pytest
import torch
from torch import nn

from lsuv_pipeline import moments as mom
from lsuv_pipeline.errors import LayerError
from lsuv_pipeline.moments import reduce_channels
from lsuv_pipeline.solve import (
    Solution,
    dead_channels,
    orthogonal_,
    output_map,
    predict,
    rescale_,
    residual,
    solve,
    transform_output,
)


def layers(dtype):
    yield nn.Linear(12, 7).to(dtype), torch.randn(300, 12, dtype=dtype) * 4 + 1
    yield nn.Conv2d(3, 6, 3).to(dtype), torch.randn(40, 3, 9, 9, dtype=dtype) - 2
    yield nn.Conv1d(4, 8, 3, groups=2).to(dtype), torch.rand(50, 4, 20, dtype=dtype)
    yield nn.ConvTranspose2d(4, 6, 3, groups=2).to(dtype), torch.randn(30, 4, 5, 5, dtype=dtype)
    yield nn.Conv3d(2, 3, 2, bias=False).to(dtype), torch.randn(20, 2, 4, 4, 4, dtype=dtype) + 3


def channel_dim(layer):
    return -1 if isinstance(layer, nn.Linear) else 1


def measured(layer, x):
    with torch.no_grad():
        return mom.from_batch(layer(x), channel_dim(layer))


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float64, 1e-10)])
@pytest.mark.parametrize("mode", ["tensor", "channel"])
@pytest.mark.parametrize("target_std", [1.0, 0.5])
def test_outputs_after_the_solve_have_mean_0_and_the_target_std(dtype, tol, mode, target_std):
    for layer, x in layers(dtype):
        has_bias = layer.bias is not None
        m = measured(layer, x)
        sol = solve(m, mode=mode, target_std=target_std, has_bias=has_bias, layer="l")
        rescale_(layer, sol)
        after = measured(layer, x)
        view = mom.reduce_channels(after) if mode == "tensor" else after
        assert (view.std - target_std).abs().max() <= tol * target_std, type(layer)
        if has_bias:
            assert view.mean.abs().max() <= tol, type(layer)
        else:  # the mean is not solved; what remains is the mean scaled with the weights
            before = mom.reduce_channels(m) if mode == "tensor" else m
            expect = before.mean / sol.scale
            assert torch.allclose(view.mean, expect, rtol=1e-4, atol=tol)


def test_channel_mode_scales_each_output_channel_of_a_grouped_transposed_conv():
    layer = nn.ConvTranspose2d(4, 6, 3, groups=2).double()
    x = torch.randn(30, 4, 5, 5, dtype=torch.float64)
    with torch.no_grad():
        layer.weight[:, 1] *= 50  # make one output channel of each group much larger
    m = measured(layer, x)
    rescale_(layer, solve(m, mode="channel", target_std=1.0, has_bias=True))
    after = measured(layer, x)
    assert torch.allclose(after.std, torch.ones(6, dtype=torch.float64), atol=1e-10)


#: Output shapes and channel dims: conv2d, conv3d, conv1d, linear, linear over a sequence.
SHAPES = [
    ((16, 6, 9, 9), 1),
    ((4, 6, 3, 5, 5), 1),
    ((16, 6, 20), 1),
    ((40, 6), -1),
    ((5, 7, 6), -1),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("mode", ["tensor", "channel"])
@pytest.mark.parametrize("shape,dim", SHAPES)
def test_output_map_is_one_rounding_of_y_times_factor_plus_offset(dtype, mode, shape, dim):
    # conv outputs on the CPU take batch norm's kernel, the rest addcmul: either way each
    # value is y * factor + offset rounded once (a fused multiply-add), not twice
    g = torch.Generator().manual_seed(1)
    y = torch.randn(shape, generator=g, dtype=dtype) * 3 + 1
    c = shape[dim]
    size = () if mode == "tensor" else (c,)
    sol = Solution(
        scale=torch.rand(size, generator=g, dtype=torch.float64) + 0.3,
        shift=torch.randn(size, generator=g, dtype=torch.float64),
    )
    out_map = output_map(sol, torch.device("cpu"), dtype)
    view = [1] * y.ndim
    view[dim] = -1
    f = out_map.factor.view(view) if mode == "channel" else out_map.factor
    o = out_map.offset.view(view) if mode == "channel" else out_map.offset
    out = transform_output(y, out_map, dim)
    assert out.dtype == dtype and out.shape == y.shape
    if dtype == torch.float32:  # float64 holds the float32 product exactly
        fused = (y.double() * f.double() + o.double()).float()
        assert torch.equal(out, fused)
    else:
        assert torch.allclose(out, y * f + o, rtol=1e-15, atol=1e-15)


def test_a_dead_channel_keeps_the_pooled_scale_and_only_a_constant_layer_is_an_error():
    layer = nn.Conv2d(2, 4, 1)
    with torch.no_grad():
        layer.weight[2] = 0  # channel 2 is its bias on every sample
    m = measured(layer, torch.randn(10, 2, 3, 3))
    assert dead_channels(m) == [2]
    pooled = reduce_channels(m).var.sqrt()
    sol = solve(m, mode="channel", target_std=1.0, has_bias=True, layer="block.conv")
    assert sol.scale[2] == pooled and torch.equal(sol.scale[[0, 1, 3]], m.std[[0, 1, 3]])
    after = predict(m, sol)
    assert after.mean[2] == 0 and after.m2[2] == 0  # still dead, centred
    assert residual(after, mode="channel", target_std=1.0).within(1e-12)  # live channels
    for mode in ("tensor", "channel"):  # pooled over channels, the dead one included
        sol = solve(m, mode=mode, target_std=1.0, has_bias=True, layer="block.conv")
        assert residual(predict(m, sol), mode=mode, target_std=1.0).within(1e-12)
    with torch.no_grad():
        layer.weight.zero_()
    m = measured(layer, torch.randn(10, 2, 3, 3))
    for mode in ("tensor", "channel"):
        with pytest.raises(LayerError, match=r"'block.conv': its whole output is constant"):
            solve(m, mode=mode, target_std=1.0, has_bias=True, layer="block.conv")


def test_non_finite_output_is_an_error():
    x = torch.randn(10, 3)
    x[4, 1] = float("nan")
    m = measured(nn.Linear(3, 2), x)
    with pytest.raises(LayerError, match="not finite"):
        solve(m, mode="tensor", target_std=1.0, has_bias=True, layer="fc")


def test_orthogonal_pre_init_is_orthonormal_and_seeded():
    a, b = nn.Linear(16, 8), nn.Linear(16, 8)
    orthogonal_([a], generator=torch.Generator().manual_seed(3))
    orthogonal_([b], generator=torch.Generator().manual_seed(3))
    assert torch.equal(a.weight, b.weight)
    assert torch.allclose(a.weight @ a.weight.T, torch.eye(8), atol=1e-5)


@pytest.mark.parametrize("scale_shape", [(), (8,)])
def test_a_half_precision_output_is_mapped_in_float32_and_rounded_once(scale_shape):
    gen = torch.Generator().manual_seed(0)
    scale = (1 / 1.2345) * torch.ones(scale_shape, dtype=torch.float64)
    shift = 0.3 * torch.ones(scale_shape, dtype=torch.float64)
    y = torch.randn(16, 8, 5, 5, generator=gen).to(torch.bfloat16)
    out_map = output_map(Solution(scale, shift), torch.device("cpu"), torch.bfloat16)
    assert out_map.factor.dtype == torch.float32  # 1.2345 is 1.234375 in bfloat16
    mapped = transform_output(y, out_map, 1)
    view = (1, -1, 1, 1) if scale_shape else ()
    exact = y.double() / scale.view(view) - shift.view(view) / scale.view(view)
    assert mapped.dtype == torch.bfloat16
    assert torch.equal(mapped, exact.float().to(torch.bfloat16))
