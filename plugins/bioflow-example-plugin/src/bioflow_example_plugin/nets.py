"""A dilated residual network: a full-resolution alternative to the U-Net.

No pooling: every layer keeps the full resolution, and dilated convolutions widen the receptive
field instead (Yu and Koltun, 2016). Any input size works (``size_multiple`` is 1).
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn


class _Block(nn.Module):
    def __init__(self, width: int, dilation: int, conv: type[nn.Module], norm: type[nn.Module]) -> None:
        super().__init__()
        self.body = nn.Sequential(
            conv(width, width, 3, padding=dilation, dilation=dilation), norm(width), nn.ReLU(inplace=True),
            conv(width, width, 3, padding=dilation, dilation=dilation), norm(width),
        )
        self.act = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(x + self.body(x))


class DilatedResNet(nn.Module):
    """Residual blocks with dilations 1, 2, 4, ... (doubling up to ``max_dilation``, then repeating).

    Parameters
    ----------
    in_channels, out_channels
        Supplied by bioflow from the task and the data.
    spatial_dims
        2 or 3.
    width
        Feature maps in every layer.
    blocks
        Number of residual blocks (two 3×3 convolutions each).
    max_dilation
        Largest dilation.
    """

    bioflow_spatial_dims = (2, 3)
    bioflow_exports = ("torchscript",)

    def __init__(self, in_channels: int, out_channels: int, spatial_dims: Literal[2, 3] = 2, width: int = 32,
                 blocks: int = 4, max_dilation: int = 8) -> None:
        super().__init__()
        conv = {2: nn.Conv2d, 3: nn.Conv3d}[spatial_dims]
        norm = {2: nn.BatchNorm2d, 3: nn.BatchNorm3d}[spatial_dims]
        self.dilations = [min(2**i, max_dilation) for i in range(blocks)]
        self.stem = nn.Sequential(conv(in_channels, width, 3, padding=1), norm(width), nn.ReLU(inplace=True))
        self.blocks = nn.Sequential(*[_Block(width, d, conv, norm) for d in self.dilations])
        self.head = conv(width, out_channels, 1)

    @property
    def size_multiple(self) -> int:
        return 1

    def receptive_field(self) -> int:
        """1 + 2 (stem) + 2 × 2 × dilation per block."""
        return 1 + 2 + sum(4 * d for d in self.dilations)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(self.stem(x)))
