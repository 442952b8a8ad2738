"""The StarDist network (2D and 3D): any registered backbone plus a head for object probability and
ray distances; the dimensionality is the grid's length."""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
from torch import nn

from bioflow.models.unet import pointwise


def grid_stages(grid: Sequence[int]) -> list[tuple[int, ...]]:
    """The pooling factors, stage by stage, that bring full resolution down to ``grid``.

    Factors of 2 while an axis still divides by 2, then what remains in one stage: ``(2, 2)`` is one
    stage, ``(4, 4)`` two stages of 2, ``(1, 2)`` one stage ``(1, 2)``, ``(3, 3)`` one stage of 3.
    """
    remaining = [int(g) for g in grid]
    stages = []
    while any(r > 1 for r in remaining):
        factors = [2 if r % 2 == 0 else r for r in remaining]
        stages.append(tuple(factors))
        remaining = [r // f for r, f in zip(remaining, factors)]
    return stages


def _layers(dims: int):
    if dims not in (2, 3):
        raise ValueError(f"StarDist networks are 2D or 3D; a grid of {dims} values was given")
    return (nn.Conv2d, nn.MaxPool2d, nn.AvgPool2d) if dims == 2 else (nn.Conv3d, nn.MaxPool3d, nn.AvgPool3d)


class GridStem(nn.Sequential):
    """Full resolution to the output grid before the backbone: per stage, two 3×3 (3×3×3)
    convolutions with ReLU and a max-pooling by the stage's factors.

    With ``grid = (2, 2)`` the backbone then works on a quarter of the pixels, which is where most
    of a StarDist network's cost lies; the objects are still covered by several grid points each.
    """

    def __init__(self, in_channels: int, channels: int, grid: Sequence[int]) -> None:
        conv, max_pool, _ = _layers(len(grid))
        layers: list[nn.Module] = []
        self.stages = grid_stages(grid)
        for factors in self.stages:
            # Max-pooling before the second ReLU: the two commute (ReLU is monotone), values and
            # gradients are the same, and the ReLU then runs on the pooled, smaller activation.
            layers += [conv(in_channels, channels, 3, padding=1), nn.ReLU(inplace=True),
                       conv(channels, channels, 3, padding=1), max_pool(factors), nn.ReLU(inplace=True)]
            in_channels = channels
        super().__init__(*layers)

    def input_window(self, window: int) -> int:
        """Input pixels that ``window`` pixels after the stem depend on (per axis, the widest)."""
        for factors in reversed(self.stages):
            window = window * max(factors) + 4
        return window


class StarDistNet(nn.Module):
    """Backbone features -> 3×3 convolution -> probability logit and distances, on the output grid.

    Parameters
    ----------
    backbone
        A network mapping ``(N, C, *spatial)`` to ``(N, features, *spatial)`` (e.g. a U-Net from the
        registry built with ``out_channels = features``). With a ``stem`` its input channels are
        the stem's, otherwise the image's.
    features
        Channels the backbone outputs.
    n_rays
        Number of ray distances predicted per pixel.
    grid
        Output subsampling ``(gy, gx)`` (2D) or ``(gz, gy, gx)`` (3D): the head predicts for pixels
        ``(i * gy, j * gx)``.
    head_features
        Channels of the 3×3 convolution (with ReLU) between backbone and outputs (0: none).
    stem
        A :class:`GridStem` that pools to the grid before the backbone (the backbone then runs at
        the grid's resolution); without one the backbone runs at full resolution and its output
        and the head's features are average-pooled to the grid.

    The output is ``(N, 1 + n_rays, H / gy, W / gx)`` (likewise in 3D): channel 0 is the object probability as a
    logit (a sigmoid gives the probability), channels 1.. are distances in full-resolution pixels.
    """

    def __init__(self, backbone: nn.Module, features: int, n_rays: int, grid: Sequence[int] = (1, 1),
                 head_features: int = 32, stem: GridStem | None = None) -> None:
        super().__init__()
        self.stem = stem
        self.backbone = backbone
        self.grid = tuple(int(g) for g in grid)
        self.n_rays = n_rays
        conv, _, avg_pool = _layers(len(self.grid))
        pooled = stem is None and any(g > 1 for g in self.grid)
        self.pool = avg_pool(self.grid) if pooled else nn.Identity()
        if head_features:
            self.features = nn.Sequential(conv(features, head_features, 3, padding=1), nn.ReLU(inplace=True))
        else:
            self.features = nn.Identity()
        width = head_features or features
        self.prob = conv(width, 1, 1)
        self.dist = conv(width, n_rays, 1)

    @property
    def size_multiple(self) -> int:
        backbone = int(getattr(self.backbone, "size_multiple", 1))
        if self.stem is not None:
            return math.lcm(*(g * backbone for g in self.grid))
        return math.lcm(backbone, *self.grid)

    def receptive_field(self) -> int:
        """Input pixels one output value depends on: backbone, the head's 3×3 convolution, and the
        stem (or the final pooling)."""
        head = 2 if isinstance(self.features, nn.Sequential) else 0
        window = int(self.backbone.receptive_field()) + head
        if self.stem is not None:
            return self.stem.input_window(window)
        return window + max(self.grid) - 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stem is not None:
            h = self.features(self.backbone(self.stem(x)))
        else:
            h = self.pool(self.features(self.backbone(x)))
        # Both outputs in one pointwise product: one pass over the features, no concatenation.
        weight = torch.cat([self.prob.weight, self.dist.weight])
        prob_bias, dist_bias = self.prob.bias, self.dist.bias
        bias: Optional[torch.Tensor] = None
        if prob_bias is not None and dist_bias is not None:  # (always: both are built with a bias)
            bias = torch.cat([prob_bias, dist_bias])
        return pointwise(h, weight, bias)
