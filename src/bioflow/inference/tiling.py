"""Tiled prediction: overlapping tiles, blended so that the result matches whole-image prediction.

A pixel near a tile's inner edge (an edge that is not the image border) lacks part of its
receptive field, so its prediction differs from the whole-image one. Each tile therefore weighs its
pixels by a profile that is zero within ``context`` pixels of an inner edge (half the receptive
field, rounded up), then rises along a raised-cosine ramp to one; overlapping tiles are averaged
with these weights. With an overlap of at least :func:`minimum_overlap` (the receptive field,
rounded up to even) every pixel has a tile that sees its whole receptive field, and the blend
reproduces the whole-image prediction up to float rounding; with less overlap the ramp still hides
seams but the result is approximate. Tile starts are multiples
of the network's size multiple so that pooling windows line up with the whole image's.

The image is first padded (reflection) at its far ends to a multiple of the network's size
multiple, exactly as a whole-image prediction would pad it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import numpy as np
import torch
from torch.nn import functional as F

# Weight given to pixels without full context, so that every pixel has a defined value.
_FLOOR = 1e-12


def pad_to_multiple(x: torch.Tensor, multiple: int, spatial_dims: int) -> tuple[torch.Tensor, tuple[int, ...]]:
    """Pad the trailing ``spatial_dims`` axes at their ends (reflection) to multiples of ``multiple``."""
    shape = tuple(x.shape[-spatial_dims:])
    target = tuple(int(math.ceil(s / multiple) * multiple) for s in shape)
    if target == shape:
        return x, shape
    pad: list[int] = []
    for s, t in zip(reversed(shape), reversed(target)):
        pad += [0, t - s]
    mode = "reflect" if all(t - s < s for s, t in zip(shape, target)) else "replicate"
    squeeze = x.ndim == spatial_dims + 1
    xb = x[None] if squeeze else x
    out = F.pad(xb, pad, mode=mode)
    return (out[0] if squeeze else out), shape


def context_margin(receptive_field: int) -> int:
    """Pixels an output pixel can reach on either side: half the receptive field, rounded up.

    The receptive field of a network with pooling is not centred on every pixel in the same way;
    the reach on one side is at most ``ceil(rf / 2)`` for the U-Nets bioflow ships (measured by a
    gradient probe in the tests).
    """
    return (int(receptive_field) + 1) // 2


def minimum_overlap(receptive_field: int) -> int:
    """The overlap of neighbouring tiles that makes tiled prediction exact."""
    return 2 * context_margin(receptive_field)


def _axis_starts(size: int, tile: int, overlap: int, multiple: int) -> list[int]:
    """Evenly spread tile starts, multiples of ``multiple``, neighbours overlapping by >= ``overlap``."""
    if tile >= size:
        return [0]
    stride = max(multiple, (tile - overlap) // multiple * multiple)
    n = int(math.ceil((size - tile) / stride)) + 1
    starts = np.linspace(0, size - tile, n)
    starts = (np.floor(starts / multiple) * multiple).astype(int)
    starts[-1] = size - tile  # size and tile are multiples of `multiple`, so this is too
    return sorted(set(int(s) for s in starts))


def _profile(length: int, start: int, size: int, context: int, ramp: int) -> np.ndarray:
    """Weight along one axis of a tile that covers [start, start + length) of an axis of ``size``."""
    t = np.arange(length, dtype=np.float64)
    w = np.ones(length)
    rise = 0.5 - 0.5 * np.cos(np.pi * np.clip((t - context + 0.5) / ramp, 0.0, 1.0))
    if start > 0:
        w *= np.where(t < context, 0.0, rise)
    if start + length < size:
        w *= np.where(t[::-1] < context, 0.0, rise[::-1])
    return np.maximum(w, _FLOOR)


@dataclass(frozen=True)
class TilePlan:
    """Where the tiles of one (padded) image lie and how each is weighted.

    Parameters
    ----------
    shape
        Spatial shape of the padded image (multiples of ``multiple``).
    tile
        Tile size per axis (clipped to the image).
    overlap
        Minimum overlap of neighbouring tiles per axis.
    context
        Pixels next to an inner tile edge that get (almost) no weight: half the receptive field.
    multiple
        Tile starts and sizes are multiples of this (the network's ``2**depth``).
    """

    shape: tuple[int, ...]
    tile: tuple[int, ...]
    overlap: tuple[int, ...]
    context: tuple[int, ...]
    multiple: int = 1

    @classmethod
    def create(
        cls,
        shape: Sequence[int],
        tile: Sequence[int],
        overlap: Sequence[int],
        receptive_field: int,
        multiple: int = 1,
    ) -> "TilePlan":
        tile = tuple(min(int(math.ceil(t / multiple) * multiple), s) for t, s in zip(tile, shape))
        overlap = tuple(min(int(o), t // 2) for o, t in zip(overlap, tile))
        context = tuple(min(context_margin(receptive_field), o // 2) for o in overlap)
        return cls(tuple(int(s) for s in shape), tile, overlap, context, multiple)

    def starts(self) -> list[list[int]]:
        return [_axis_starts(s, t, o, self.multiple) for s, t, o in zip(self.shape, self.tile, self.overlap)]

    def __len__(self) -> int:
        return int(np.prod([len(s) for s in self.starts()]))

    def tiles(self) -> Iterator[tuple[tuple[slice, ...], np.ndarray]]:
        """Each tile's box and its weight map (float32, the tile's shape)."""
        axes = self.starts()
        for corner in np.stack(np.meshgrid(*axes, indexing="ij"), -1).reshape(-1, len(axes)):
            box = tuple(slice(int(a), int(a) + t) for a, t in zip(corner, self.tile))
            profiles = [
                _profile(t, int(a), s, c, max(1, o - 2 * c))
                for a, t, s, c, o in zip(corner, self.tile, self.shape, self.context, self.overlap)
            ]
            weight = profiles[0]
            for p in profiles[1:]:
                weight = np.multiply.outer(weight, p)
            yield box, weight.astype(np.float32)


def predict_tiled(
    fn: Callable[[torch.Tensor], torch.Tensor],
    image: torch.Tensor,
    tile: Sequence[int],
    overlap: Sequence[int],
    receptive_field: int,
    multiple: int = 1,
    batch_size: int = 4,
) -> torch.Tensor:
    """Apply ``fn`` to an in-memory image tile by tile and blend the tiles.

    Parameters
    ----------
    fn
        Maps a batch ``(B, C, *tile)`` to ``(B, K, *tile)`` (same spatial size).
    image
        ``(C, *spatial)``; the result is ``(K, *spatial)`` on the same device.
    tile, overlap
        Tile size and minimum overlap per spatial axis.
    receptive_field
        The network's receptive field in pixels (sets the context margin).
    multiple
        The network's size multiple (``2**depth`` for a U-Net).
    batch_size
        Tiles per call of ``fn``.
    """
    spatial_dims = len(tile)
    padded, original = pad_to_multiple(image, multiple, spatial_dims)
    plan = TilePlan.create(padded.shape[1:], tile, overlap, receptive_field, multiple)
    out: torch.Tensor | None = None
    norm = torch.zeros(padded.shape[1:], device=image.device)
    pending: list[tuple[tuple[slice, ...], np.ndarray]] = []

    def flush() -> None:
        nonlocal out, norm
        batch = torch.stack([padded[(slice(None),) + box] for box, _ in pending])
        pred = fn(batch)
        if out is None:  # accumulate in at least float32 (mixed-precision outputs are float16)
            dtype = torch.promote_types(pred.dtype, torch.float32)
            out = torch.zeros((pred.shape[1],) + tuple(padded.shape[1:]), device=image.device, dtype=dtype)
            norm = norm.to(dtype)
        for (box, weight), p in zip(pending, pred):
            w = torch.from_numpy(weight).to(device=image.device, dtype=out.dtype)
            out[(slice(None),) + box] += p * w
            norm[box] += w
        pending.clear()

    for item in plan.tiles():
        pending.append(item)
        if len(pending) == batch_size:
            flush()
    if pending:
        flush()
    assert out is not None
    out = out / norm
    crop = (slice(None),) + tuple(slice(0, s) for s in original)
    return out[crop]
