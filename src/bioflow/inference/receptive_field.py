"""Receptive field of an arbitrary network, measured by a gradient probe.

Architectures that know their receptive field expose ``receptive_field()`` (bioflow's U-Net does,
from its layer geometry). For any other network, the receptive field is measured: the gradient of
one central output pixel with respect to the input is non-zero exactly on the input pixels that
influence it. A few random inputs and all alignments to the network's size multiple are combined,
because a ReLU can silence a path for one input but not for all.
"""

from __future__ import annotations

import copy

import torch


def probe_receptive_field(
    net: torch.nn.Module,
    in_channels: int,
    spatial_dims: int,
    multiple: int = 1,
    trials: int = 3,
    max_size: int | None = None,
) -> int:
    """Largest extent (pixels, over all axes) of the input region that reaches one output pixel.

    The probe input grows until the region no longer touches its border (up to ``max_size``,
    default 1024 in 2D and 128 in 3D; a field that still touches the border then is reported
    as ``max_size``).
    """
    probe = copy.deepcopy(net).double().eval()
    limit = max_size or (1024 if spatial_dims == 2 else 128)
    size = max(32, multiple * 4)
    with torch.enable_grad():  # prediction runs under no_grad; the probe needs gradients
        while True:
            extent, touches = _measure(probe, in_channels, spatial_dims, size, multiple, trials)
            if not touches or size >= limit:
                return min(extent, limit)
            size = min(size * 2, limit)


def _measure(net, in_channels: int, spatial_dims: int, size: int, multiple: int, trials: int) -> tuple[int, bool]:
    seen = torch.zeros((size,) * spatial_dims, dtype=torch.bool)
    extent = 0
    generator = torch.Generator().manual_seed(0)
    for offset in range(min(multiple, 4)):
        for _ in range(trials):
            x = torch.rand((1, in_channels) + (size,) * spatial_dims, dtype=torch.float64, generator=generator)
            x.requires_grad_(True)
            out = net(x)
            centre = tuple(s // 2 + offset for s in out.shape[2:])
            out[(0, slice(None)) + centre].sum().backward()
            hit = (x.grad[0] != 0).any(dim=0)
            seen |= hit
            nz = hit.nonzero()
            if len(nz):
                extent = max(extent, int((nz.max(0).values - nz.min(0).values + 1).max()))
    nz = seen.nonzero()
    touches = bool(len(nz)) and (int(nz.min()) == 0 or int(nz.max()) == size - 1)
    return extent, touches
