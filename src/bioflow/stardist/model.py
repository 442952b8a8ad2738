"""The StarDist network: any registered backbone plus a head for object probability and ray distances."""

from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import nn


class StarDistNet(nn.Module):
    """``backbone`` features -> 3×3 convolution -> (grid pooling) -> probability logit and distances.

    Parameters
    ----------
    backbone
        A network mapping ``(N, C, H, W)`` to ``(N, features, H, W)`` (e.g. a U-Net from the
        registry built with ``out_channels = features``).
    features
        Channels the backbone outputs.
    n_rays
        Number of ray distances predicted per pixel.
    grid
        Output subsampling ``(gy, gx)``: the head predicts for pixels ``(i * gy, j * gx)``.

    The output is ``(N, 1 + n_rays, H / gy, W / gx)``: channel 0 is the object probability as a
    logit (a sigmoid gives the probability), channels 1.. are distances in full-resolution pixels.
    """

    def __init__(self, backbone: nn.Module, features: int, n_rays: int, grid: Sequence[int] = (1, 1)) -> None:
        super().__init__()
        self.backbone = backbone
        self.grid = tuple(int(g) for g in grid)
        self.n_rays = n_rays
        self.features = nn.Sequential(nn.Conv2d(features, features, 3, padding=1), nn.ReLU(inplace=True))
        self.pool = nn.AvgPool2d(self.grid) if any(g > 1 for g in self.grid) else nn.Identity()
        self.prob = nn.Conv2d(features, 1, 1)
        self.dist = nn.Conv2d(features, n_rays, 1)

    @property
    def size_multiple(self) -> int:
        backbone = int(getattr(self.backbone, "size_multiple", 1))
        return math.lcm(backbone, *self.grid)

    def receptive_field(self) -> int:
        """The backbone's receptive field, widened by the head's 3×3 convolution and the grid pooling."""
        return int(self.backbone.receptive_field()) + 2 + max(self.grid) - 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.pool(self.features(self.backbone(x)))
        return torch.cat([self.prob(h), self.dist(h)], dim=1)
