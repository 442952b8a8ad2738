"""U-Net: output shapes for 2D/3D and every option; the receptive field against a gradient probe."""

from __future__ import annotations

import itertools

import pytest
import torch

from bioflow.models.unet import UNet

OPTIONS = list(
    itertools.product(["batch", "instance", "none"], ["relu", "leaky_relu", "sigmoid", "maxout"], ["max", "avg", "blur"], ["transpose", "interpolate", "nearest", "linear"])
)


@pytest.mark.parametrize(("norm", "activation", "pooling", "upsampling"), OPTIONS)
def test_2d_shapes_for_every_option(norm, activation, pooling, upsampling):
    net = UNet(3, 5, spatial_dims=2, depth=2, base_channels=4, norm=norm, activation=activation,
               pooling=pooling, upsampling=upsampling)
    out = net(torch.randn(2, 3, 32, 48))
    assert out.shape == (2, 5, 32, 48)
    out.mean().backward()
    assert all(p.grad is not None for p in net.parameters())


@pytest.mark.parametrize("depth", [0, 1, 3])
@pytest.mark.parametrize("upsampling", ["transpose", "interpolate", "nearest", "linear"])
def test_3d_shapes(depth, upsampling):
    net = UNet(2, 3, spatial_dims=3, depth=depth, base_channels=2, upsampling=upsampling, norm="instance")
    size = 2**depth * 2
    assert net(torch.randn(1, 2, size, size + 2**depth, size)).shape == (1, 3, size, size + 2**depth, size)


def test_nearest_upsampling_has_the_csbdeep_layout():
    """Weight-free up-sampling: each block's last convolution halves the channels (CSBDeep's U-Net).

    Hand count for depth 3, 32 base channels, 32 channels in and out: encoder 32-32-32, 32-64-64,
    64-128-128; bottom 128-256-128; decoder (concatenated input) 256-128-64, 128-64-32, 64-32-32;
    head 1x1 32-32.
    """

    def conv(cin, cout, k=3):
        return k * k * cin * cout + cout

    expected = (
        conv(32, 32) + conv(32, 32) + conv(32, 64) + conv(64, 64) + conv(64, 128) + conv(128, 128)
        + conv(128, 256) + conv(256, 128)
        + conv(256, 128) + conv(128, 64) + conv(128, 64) + conv(64, 32) + conv(64, 32) + conv(32, 32)
        + conv(32, 32, k=1)
    )
    net = UNet(32, 32, depth=3, base_channels=32, norm="none", upsampling="nearest")
    assert sum(p.numel() for p in net.parameters()) == expected
    assert net(torch.randn(1, 32, 16, 24)).shape == (1, 32, 16, 24)


def test_residual_adds_the_input():
    net = UNet(2, 2, depth=1, base_channels=4, residual=True)
    torch.nn.init.zeros_(net.head.weight)
    torch.nn.init.zeros_(net.head.bias)
    x = torch.randn(1, 2, 16, 16)
    assert torch.equal(net(x), x)
    with pytest.raises(ValueError, match="multiple of in_channels"):
        UNet(2, 3, residual=True)
    wide = UNet(2, 4, depth=1, base_channels=4, residual=True)  # a location and a scale per channel
    torch.nn.init.zeros_(wide.head.weight)
    torch.nn.init.zeros_(wide.head.bias)
    assert torch.equal(wide(x), torch.cat([x, torch.zeros_like(x)], dim=1))


def test_without_the_top_skip_the_output_does_not_see_full_resolution_input_directly():
    net = UNet(1, 1, depth=1, base_channels=2, skip_top=False)
    assert net.decoders[-1][0].in_channels == 2  # no concatenated skip at level 0
    assert UNet(1, 1, depth=1, base_channels=2).decoders[-1][0].in_channels == 4


def test_max_blur_pool_blurs_before_subsampling():
    from bioflow.models.unet import MaxBlurPool

    x = torch.zeros(1, 1, 8, 8)
    x[0, 0, 3, 3] = 1.0
    out = MaxBlurPool(1, 2)(x)
    assert out.shape == (1, 1, 4, 4)
    assert out.sum().item() == pytest.approx(1.0)  # the 2x2 max spreads one pixel over 4, the blur keeps the mass/4
    assert (out > 0).sum() > 1  # anti-aliased: no single-pixel response


def test_maxout_takes_the_maximum_over_pieces():
    from bioflow.models.unet import Maxout

    x = torch.tensor([[1.0, 5.0, -2.0, -3.0]]).view(1, 4, 1, 1)
    assert Maxout(2)(x).flatten().tolist() == [5.0, -2.0]


def probe(net: UNet, size: int) -> list[int]:
    """Extent of input pixels that reach the centre output pixel (positive weights, no saturation)."""
    net = net.double()
    for m in net.modules():
        if isinstance(m, (torch.nn.Conv2d, torch.nn.ConvTranspose2d)):
            torch.nn.init.uniform_(m.weight, 0.1, 1.0)
    best = [0, 0]
    for offset in range(net.size_multiple):  # every alignment of the output pixel to the pooling grid
        x = torch.rand(1, 1, size, size, dtype=torch.float64, requires_grad=True)
        c = size // 2 + offset
        net(x)[0, 0, c, c].backward()
        nz = (x.grad[0, 0] != 0).nonzero()
        extent = (nz.max(0).values - nz.min(0).values + 1).tolist()
        best = [max(a, b) for a, b in zip(best, extent)]
    return best


@pytest.mark.parametrize("depth", [0, 1, 2, 3])
@pytest.mark.parametrize("upsampling", ["transpose", "interpolate", "nearest", "linear"])
@pytest.mark.parametrize(("pooling", "skip_top"), [("max", True), ("blur", False)])
def test_receptive_field_matches_a_gradient_probe(depth, upsampling, pooling, skip_top):
    net = UNet(1, 1, depth=depth, base_channels=2, norm="none", activation="leaky_relu", upsampling=upsampling,
               pooling=pooling, skip_top=skip_top)
    rf = net.receptive_field()
    measured = probe(net, 4 * rf)
    assert max(measured) == rf


@pytest.mark.parametrize("dims", [2, 3])
@pytest.mark.parametrize("channels_last", [True, False])
def test_pointwise_equals_the_one_by_one_convolution_in_values_and_gradients(dims, channels_last):
    from bioflow.models.unet import pointwise

    g = torch.Generator().manual_seed(3)
    shape = (2, 6, *([5] * dims))
    x = torch.randn(*shape, generator=g)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last if dims == 2 else torch.channels_last_3d)
    x.requires_grad_(True)
    weight = torch.randn(4, 6, *([1] * dims), generator=g, requires_grad=True)
    bias = torch.randn(4, generator=g, requires_grad=True)
    conv = torch.nn.functional.conv2d if dims == 2 else torch.nn.functional.conv3d
    grad = torch.randn(2, 4, *([5] * dims), generator=g)
    out = pointwise(x, weight, bias)
    expected = conv(x.detach().contiguous(), weight.detach(), bias.detach())
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    grads = torch.autograd.grad(out, (x, weight, bias), grad)
    x2, w2, b2 = (t.detach().contiguous().requires_grad_(True) for t in (x, weight, bias))
    for got, want in zip(grads, torch.autograd.grad(conv(x2, w2, b2), (x2, w2, b2), grad)):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
