"""Tiled prediction agrees with whole-image prediction when the overlap covers the receptive field."""

from __future__ import annotations

import pytest
import torch

from bioflow.models.unet import UNet
from torch.nn import functional as F

from bioflow.inference.tiling import TilePlan, minimum_overlap, predict_tiled


def whole(net, x):
    """Whole-image prediction, the image padded at its far ends (reflection) to the size multiple."""
    shape = x.shape[1:]
    pads = []
    for s in reversed(shape):
        pads += [0, -s % net.size_multiple]
    out = net(F.pad(x[None], pads, mode="reflect"))[0]
    return out[(slice(None),) + tuple(slice(0, s) for s in shape)]


@pytest.mark.parametrize("upsampling", ["transpose", "interpolate", "nearest", "linear"])
@pytest.mark.parametrize("shape", [(200, 170), (64, 64), (131, 257)])
def test_2d_tiled_equals_whole(upsampling, shape):
    torch.manual_seed(0)
    net = UNet(2, 3, depth=2, base_channels=4, upsampling=upsampling).eval()
    x = torch.randn(2, *shape)
    rf = net.receptive_field()
    overlap = minimum_overlap(rf)
    with torch.no_grad():
        tiled = predict_tiled(net, x, (112, 112), (overlap, overlap), rf, net.size_multiple, batch_size=3)
        reference = whole(net, x)
    assert tiled.shape == reference.shape
    assert (tiled - reference).abs().max().item() < 1e-4


def test_3d_tiled_equals_whole():
    torch.manual_seed(0)
    net = UNet(1, 2, spatial_dims=3, depth=1, base_channels=2).eval()
    x = torch.randn(1, 30, 50, 41)
    rf = net.receptive_field()
    with torch.no_grad():
        tiled = predict_tiled(net, x, (24, 40, 40), (minimum_overlap(rf),) * 3, rf, net.size_multiple)
        reference = whole(net, x)
    assert (tiled - reference).abs().max().item() < 1e-4


def test_overlap_below_the_receptive_field_is_only_approximate():
    torch.manual_seed(0)
    net = UNet(1, 1, depth=2, base_channels=4, norm="none", activation="leaky_relu").double().eval()
    for m in net.modules():  # positive weights: every pixel of the receptive field matters
        if isinstance(m, (torch.nn.Conv2d, torch.nn.ConvTranspose2d)):
            torch.nn.init.uniform_(m.weight, 0.0, 0.2)
    x = torch.rand(1, 160, 160, dtype=torch.float64)
    rf = net.receptive_field()
    with torch.no_grad():
        reference = whole(net, x)
        exact = predict_tiled(net, x, (96, 96), (minimum_overlap(rf),) * 2, rf, net.size_multiple)
        short = predict_tiled(net, x, (96, 96), (8, 8), rf, net.size_multiple)
    scale = reference.abs().max().item()
    assert (exact - reference).abs().max().item() < 1e-9 * scale
    assert (short - reference).abs().max().item() > 1e-4 * scale


def test_plan_covers_every_pixel_with_weight():
    plan = TilePlan.create((256, 200), (96, 96), (40, 40), receptive_field=40, multiple=4)
    cover = torch.zeros(256, 200)
    for box, weight in plan.tiles():
        assert all(s.start % 4 == 0 for s in box)
        cover[box] += torch.from_numpy(weight)
    assert cover.min().item() >= 0.49  # every pixel has a tile that sees its whole receptive field


def test_tta_is_the_mean_over_the_eight_dihedral_transforms():
    torch.manual_seed(1)
    net = UNet(1, 2, depth=1, base_channels=4).eval()
    x = torch.randn(1, 64, 64)
    rf = net.receptive_field()
    with torch.no_grad():
        tta = predict_tiled(net, x, (64, 64), (minimum_overlap(rf),) * 2, rf, net.size_multiple, tta=True)
        expected = torch.zeros(2, 64, 64)
        for k in range(4):
            for flip in (False, True):
                v = torch.flip(x, (2,)) if flip else x
                y = torch.rot90(whole(net, torch.rot90(v, k, (1, 2))), -k, (1, 2))
                expected += torch.flip(y, (2,)) if flip else y
        expected /= 8
        plain = predict_tiled(net, x, (64, 64), (minimum_overlap(rf),) * 2, rf, net.size_multiple)
    assert (tta - expected).abs().max().item() < 1e-5
    assert (tta - plain).abs().max().item() > 1e-4  # a random network is not rotation invariant


def test_blend_none_is_exact_too_with_enough_overlap():
    torch.manual_seed(2)
    net = UNet(1, 1, depth=2, base_channels=4).eval()
    x = torch.randn(1, 150, 170)
    rf = net.receptive_field()
    with torch.no_grad():
        cut = predict_tiled(net, x, (112, 112), (minimum_overlap(rf),) * 2, rf, net.size_multiple, blend="none")
    assert (cut - whole(net, x)).abs().max().item() < 1e-4


@pytest.mark.parametrize("upsampling", ["transpose", "interpolate", "nearest", "linear"])
def test_gradient_probe_finds_the_analytic_receptive_field(upsampling):
    from bioflow.inference.receptive_field import probe_receptive_field

    net = UNet(1, 2, depth=2, base_channels=4, upsampling=upsampling)
    assert probe_receptive_field(net, 1, 2, net.size_multiple) == net.receptive_field()
