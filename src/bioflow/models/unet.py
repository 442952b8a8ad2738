"""U-Net (Ronneberger et al., 2015) for 2D and 3D images, with the options the field teaches.

The network keeps the spatial size: convolutions are padded ("same"), so an input whose sizes are
multiples of ``2**depth`` gives an output of the same size. Tiled prediction pads other sizes.
"""

from __future__ import annotations

from typing import Literal, Optional

import torch
from torch import nn
from torch.nn import functional as F

Norm = Literal["batch", "instance", "none"]
Activation = Literal["relu", "leaky_relu", "sigmoid", "maxout"]
Pooling = Literal["max", "avg", "blur"]
Upsampling = Literal["transpose", "interpolate", "nearest", "linear"]


class Maxout(nn.Module):
    """Maxout over groups of ``pieces`` consecutive channels (Goodfellow et al., 2013)."""

    def __init__(self, pieces: int) -> None:
        super().__init__()
        self.pieces = pieces

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.unflatten(1, [x.shape[1] // self.pieces, self.pieces]).amax(dim=2)


def _conv(spatial_dims: int) -> type[nn.Module]:
    return {2: nn.Conv2d, 3: nn.Conv3d}[spatial_dims]


def pointwise(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    """A 1×1 (1×1×1) convolution of ``x`` with ``weight`` ``(out, in, 1, 1[, 1])`` and ``bias``.

    On channels-last activations (bioflow's training layout) it is one matrix product over the
    channels, which keeps the layout and avoids the slow unfused path that a 1×1 convolution of a
    small batch takes on a CPU thread (zero-filled gradient buffers, layout copies). Otherwise it is
    the plain convolution. Both give the same values up to rounding.
    """
    layout = torch.channels_last if x.dim() == 4 else torch.channels_last_3d
    if x.dim() in (4, 5) and x.shape[1] > 1 and x.is_contiguous(memory_format=layout):
        return F.linear(x.movedim(1, -1), weight.flatten(1), bias).movedim(-1, 1)
    if x.dim() == 4:
        return F.conv2d(x, weight, bias)
    return F.conv3d(x, weight, bias)


class ConvBlock(nn.Sequential):
    """Two 3×3(×3) convolutions, each followed by normalisation and the activation.

    The first convolution gives ``out_channels``, the second ``last_channels`` (default: the same).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        spatial_dims: int,
        norm: Norm,
        activation: Activation,
        maxout_pieces: int,
        last_channels: int | None = None,
    ) -> None:
        conv = _conv(spatial_dims)
        widen = maxout_pieces if activation == "maxout" else 1
        layers: list[nn.Module] = []
        channels = in_channels
        for width in (out_channels, out_channels if last_channels is None else last_channels):
            layers.append(conv(channels, width * widen, kernel_size=3, padding=1, bias=norm == "none"))
            if norm == "batch":
                layers.append({2: nn.BatchNorm2d, 3: nn.BatchNorm3d}[spatial_dims](width * widen))
            elif norm == "instance":
                layers.append({2: nn.InstanceNorm2d, 3: nn.InstanceNorm3d}[spatial_dims](width * widen, affine=True))
            layers.append(_activation(activation, maxout_pieces))
            channels = width
        super().__init__(*layers)


def _activation(name: Activation, maxout_pieces: int) -> nn.Module:
    if name == "relu":
        return nn.ReLU(inplace=True)
    if name == "leaky_relu":
        return nn.LeakyReLU(0.01, inplace=True)
    if name == "sigmoid":
        return nn.Sigmoid()
    return Maxout(maxout_pieces)


class MaxBlurPool(nn.Module):
    """Max-blur-pool (Zhang, 2019; N2V2): 2×2 max with stride 1, then a binomial blur with stride 2.

    Anti-aliased down-sampling: plain strided max-pooling aliases, which shows as checkerboard
    artefacts in Noise2Void outputs.
    """

    def __init__(self, channels: int, spatial_dims: int) -> None:
        super().__init__()
        self.spatial_dims = spatial_dims
        self.channels = channels
        taps = torch.tensor([1.0, 2.0, 1.0])
        kernel = taps
        for _ in range(spatial_dims - 1):
            kernel = kernel[..., None] * taps
        kernel = kernel / kernel.sum()
        self.register_buffer("kernel", kernel.expand(channels, 1, *kernel.shape).contiguous(), persistent=False)
        self.max = {2: nn.MaxPool2d, 3: nn.MaxPool3d}[spatial_dims](kernel_size=2, stride=1)
        self.pad = [0, 1] * spatial_dims  # keep the size even after the stride-1 max
        self.conv = F.conv2d if spatial_dims == 2 else F.conv3d

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.max(F.pad(x, self.pad, mode="replicate"))
        return self.conv(x, self.kernel, stride=2, padding=1, groups=self.channels)


def _weight_free_up(mode: str, spatial_dims: int) -> nn.Module:
    if mode == "nearest":
        return nn.Upsample(scale_factor=2.0, mode="nearest")
    return nn.Upsample(scale_factor=2.0, mode="bilinear" if spatial_dims == 2 else "trilinear", align_corners=False)


class Up(nn.Module):
    """Doubles the spatial size and halves the channels."""

    def __init__(self, in_channels: int, out_channels: int, spatial_dims: int, mode: Upsampling) -> None:
        super().__init__()
        self.mode = mode
        if mode == "transpose":
            tconv = {2: nn.ConvTranspose2d, 3: nn.ConvTranspose3d}[spatial_dims]
            self.proj = tconv(in_channels, out_channels, kernel_size=2, stride=2)
        else:
            self.proj = _conv(spatial_dims)(in_channels, out_channels, kernel_size=1)
        self.interp = "bilinear" if spatial_dims == 2 else "trilinear"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mode == "transpose":
            return self.proj(x)
        x = F.interpolate(x, scale_factor=2.0, mode=self.interp, align_corners=False)
        return self.proj(x)


class UNet(nn.Module):
    """U-Net encoder-decoder with skip connections.

    Parameters
    ----------
    in_channels, out_channels
        Channels of the input image and of the output (classes, or restored channels). Supplied by
        the task from the data; configs normally leave them out.
    spatial_dims
        2 for images (N, C, Y, X), 3 for volumes (N, C, Z, Y, X).
    depth
        Number of down-sampling steps; inputs should be multiples of ``2**depth``.
    base_channels
        Channels at the first level; doubled at each level down.
    norm
        ``batch``, ``instance`` or ``none``.
    activation
        ``relu``, ``leaky_relu``, ``sigmoid`` or ``maxout`` (max over ``maxout_pieces`` feature maps).
    pooling
        ``max``, ``avg``, or ``blur`` (anti-aliased max-blur-pool, as in N2V2) down-sampling.
    upsampling
        ``transpose`` (learned 2×2 transposed convolution), ``interpolate`` (bilinear/trilinear
        interpolation followed by a 1×1 convolution), ``nearest`` (nearest-neighbour copies, no
        weights; the last convolution of each block below then halves the channels instead, the
        layout of CSBDeep's U-Net used by CARE and StarDist, with about a quarter fewer weights) or
        ``linear`` (the same layout with bilinear/trilinear interpolation, as CAREamics' U-Net).
    residual
        Add the input to the output (the network learns a correction); needs
        ``in_channels == out_channels``. Used for restoration.
    skip_top
        Keep the skip connection of the first (full-resolution) level. N2V2 drops it, so that the
        output cannot copy high-frequency input patterns.
    """

    bioflow_spatial_dims = (2, 3)
    bioflow_exports = ("torchscript", "onnx")

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        spatial_dims: Literal[2, 3] = 2,
        depth: int = 3,
        base_channels: int = 32,
        norm: Norm = "batch",
        activation: Activation = "relu",
        maxout_pieces: int = 2,
        pooling: Pooling = "max",
        upsampling: Upsampling = "transpose",
        residual: bool = False,
        skip_top: bool = True,
    ) -> None:
        super().__init__()
        if spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}")
        if depth < 0:
            raise ValueError(f"depth must be >= 0, got {depth}")
        if activation == "maxout" and maxout_pieces < 2:
            raise ValueError(f"maxout_pieces must be >= 2 (the maximum over that many feature maps), got {maxout_pieces}")
        if residual and out_channels % in_channels:
            raise ValueError(
                f"residual=True needs out_channels to be a multiple of in_channels (the input is added to the first "
                f"in_channels outputs), got {in_channels} and {out_channels}"
            )
        self.spatial_dims = spatial_dims
        self.depth = depth
        self.residual = residual
        self.upsampling = upsampling
        self.pooling = pooling
        self.skip_top = skip_top
        block = dict(spatial_dims=spatial_dims, norm=norm, activation=activation, maxout_pieces=maxout_pieces)
        widths = [base_channels * 2**level for level in range(depth + 1)]
        self.encoders = nn.ModuleList()  # levels 0 .. depth-1, each followed by a pooling
        channels = in_channels
        for width in widths[:-1]:
            self.encoders.append(ConvBlock(channels, width, **block))
            channels = width
        nearest = upsampling in ("nearest", "linear")  # weight-free up-sampling
        # With weight-free up-sampling, the block below hands up half its width (CSBDeep's layout).
        self.bottom = ConvBlock(channels, widths[-1], **block, last_channels=widths[-2] if nearest and depth else None)
        channels = widths[-2] if nearest and depth else widths[-1]
        self.pools = nn.ModuleList()
        for width in widths[:-1]:
            if pooling == "blur":
                self.pools.append(MaxBlurPool(width, spatial_dims))
            else:
                pool = {"max": (nn.MaxPool2d, nn.MaxPool3d), "avg": (nn.AvgPool2d, nn.AvgPool3d)}[pooling][spatial_dims - 2]
                self.pools.append(pool(kernel_size=2))
        self.ups = nn.ModuleList()
        self.decoders = nn.ModuleList()
        for level in reversed(range(depth)):
            width = widths[level]
            self.ups.append(_weight_free_up(upsampling, spatial_dims) if nearest else Up(channels, width, spatial_dims, upsampling))
            skip = level > 0 or skip_top
            last = widths[max(level - 1, 0)] if nearest else width
            self.decoders.append(ConvBlock(2 * width if skip else width, width, **block, last_channels=last))
            channels = last
        self.head = _conv(spatial_dims)(channels, out_channels, kernel_size=1)

    @property
    def size_multiple(self) -> int:
        """Spatial sizes must be multiples of this number."""
        return 1 << self.depth

    def receptive_field(self) -> int:
        """Receptive field (pixels along each axis) of one output pixel, from the layer geometry.

        Follows every path from an output pixel back to the input (skip connections and the path
        through the bottleneck) and takes the widest. Per step back: two 3×3 convolutions widen a
        window by 4; a 2×2 pooling doubles it; an up-sampling maps ``r`` fine pixels onto at most
        ``r // 2 + 1`` coarse pixels (transposed 2×2 convolution, nearest copies) or ``r // 2 + 2``
        (linear interpolation reads two neighbours). The alignment of each window is taken at its worst,
        so this is an upper bound; it is exact for the configurations in the tests.
        """

        def from_encoder(level: int, r: int) -> int:
            r += 4
            if level == 0:
                return r
            # 2x2 pooling doubles a window; max-blur-pool (2x2 max, stride-2 3x3 blur) adds 2 more
            return from_encoder(level - 1, 2 * r + (2 if self.pooling == "blur" else 0))

        def from_decoder(level: int, r: int) -> int:
            if level == self.depth:
                return from_encoder(level, r)
            r += 4
            coarse = r // 2 + (2 if self.upsampling in ("interpolate", "linear") else 1)
            through_bottom = from_decoder(level + 1, coarse)
            has_skip = level > 0 or self.skip_top
            return max(from_encoder(level, r), through_bottom) if has_skip else through_bottom

        return from_decoder(0, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips: list[torch.Tensor] = []
        h = x
        for encoder, pool in zip(self.encoders, self.pools):
            h = encoder(h)
            skips.append(h)
            h = pool(h)
        h = self.bottom(h)
        level = self.depth - 1
        for up, decoder in zip(self.ups, self.decoders):
            h = up(h)
            skip = skips.pop()
            h = decoder(torch.cat([skip, h], dim=1) if level > 0 or self.skip_top else h)
            level -= 1
        out = pointwise(h, self.head.weight, self.head.bias)
        if not self.residual:
            return out
        if out.shape[1] == x.shape[1]:
            return out + x
        # more outputs than inputs (e.g. a location and a scale per channel): the input corrects the first ones
        return torch.cat([out[:, : x.shape[1]] + x, out[:, x.shape[1]:]], dim=1)
