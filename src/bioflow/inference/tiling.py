"""Tiled prediction: overlapping tiles, blended so that the result matches whole-image prediction.

A pixel near a tile's inner edge (an edge that is not the image border) lacks part of its
receptive field, so its prediction differs from the whole-image one. Each tile therefore weighs its
pixels by a profile that is zero within ``context`` pixels of an inner edge (half the receptive
field, rounded up), then rises along a raised-cosine ramp to one; overlapping tiles are averaged
with these weights. With an overlap of at least :func:`minimum_overlap` (the receptive field,
rounded up to even) every pixel has a tile that sees its whole receptive field, and the blend
reproduces the whole-image prediction up to float rounding; with less overlap the ramp still hides
seams but the result is approximate. ``blend="none"`` replaces the ramp by a hard cut in the middle
of each overlap (each pixel from one tile).

The image is treated as if padded (by reflection) at its far ends to a multiple of the network's
size multiple, as a whole-image prediction would pad it, and tile starts are multiples of that
number so that pooling windows line up with the whole image's.

Memory depends on the tile, not on the image: tiles are read from the (possibly lazy) image one
batch at a time, and the blended output is accumulated in a strip one tile high along the first
spatial axis; each finished strip is handed to a ``sink`` (which may write it to a file) and
dropped.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Literal, Sequence

import numpy as np
import torch

Blend = Literal["cosine", "none"]
# Weight of pixels without full context: keeps every pixel defined when the overlap is too small,
# and vanishes next to the weight of pixels with full context.
_FLOOR = 1e-12


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


def padded_size(size: int, multiple: int) -> int:
    return int(math.ceil(size / multiple) * multiple)


def reflect_indices(start: int, stop: int, size: int) -> np.ndarray:
    """Source indices of positions ``start..stop-1`` of an axis of ``size`` reflected past its end."""
    idx = np.arange(start, stop)
    idx = np.where(idx < size, idx, 2 * (size - 1) - idx)
    return np.clip(idx, 0, size - 1)


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

    Build it with :meth:`create`. ``shape`` is the padded spatial shape (multiples of
    ``multiple``), ``tile`` the tile size per axis (clipped to the image), ``overlap`` the minimum
    overlap of neighbours, ``context`` the margin next to inner edges that gets no weight.
    """

    shape: tuple[int, ...]
    tile: tuple[int, ...]
    overlap: tuple[int, ...]
    context: tuple[int, ...]
    multiple: int = 1
    blend: Blend = "cosine"

    @classmethod
    def create(
        cls,
        image_shape: Sequence[int],
        tile: Sequence[int],
        overlap: Sequence[int],
        receptive_field: int,
        multiple: int = 1,
        blend: Blend = "cosine",
    ) -> "TilePlan":
        shape = tuple(padded_size(int(s), multiple) for s in image_shape)
        tile = tuple(min(padded_size(int(t), multiple), s) for t, s in zip(tile, shape))
        overlap = tuple(min(int(o), t // 2) for o, t in zip(overlap, tile))
        if blend == "none":  # cut in the middle of each overlap
            context = tuple(o // 2 for o in overlap)
        else:
            context = tuple(min(context_margin(receptive_field), o // 2) for o in overlap)
        return cls(shape, tile, overlap, context, multiple, blend)

    def scaled(self, stride: Sequence[int]) -> "TilePlan":
        """The same tiling in the coordinates of an output subsampled by ``stride`` along each axis.

        Sizes and starts are multiples of the size multiple, which networks with a strided output
        make a multiple of their stride, so the division is exact.
        """
        if all(int(g) == 1 for g in stride):
            return self
        div = [int(g) for g in stride]
        return TilePlan(
            tuple(s // g for s, g in zip(self.shape, div)), tuple(t // g for t, g in zip(self.tile, div)),
            tuple(o // g for o, g in zip(self.overlap, div)), tuple(-(-c // g) for c, g in zip(self.context, div)),
            max(1, self.multiple // max(div)), self.blend,
        )

    def starts(self) -> list[list[int]]:
        return [_axis_starts(s, t, o, self.multiple) for s, t, o in zip(self.shape, self.tile, self.overlap)]

    def __len__(self) -> int:
        return int(np.prod([len(s) for s in self.starts()]))

    def weight(self, corner: Sequence[int]) -> np.ndarray:
        """The weight map of the tile whose first pixel is at ``corner``."""
        profiles = []
        for a, t, s, c, o in zip(corner, self.tile, self.shape, self.context, self.overlap):
            ramp = 1 if self.blend == "none" else max(1, o - 2 * c)
            profiles.append(_profile(t, int(a), s, c, ramp))
        weight = profiles[0]
        for p in profiles[1:]:
            weight = np.multiply.outer(weight, p)
        return weight.astype(np.float32)

    def rows(self) -> Iterator[tuple[int, list[tuple[int, ...]]]]:
        """Tiles grouped by their start along the first axis, in increasing order."""
        starts = self.starts()
        rest = np.stack(np.meshgrid(*starts[1:], indexing="ij"), -1).reshape(-1, len(starts) - 1) if len(starts) > 1 else np.zeros((1, 0), int)
        for first in starts[0]:
            yield first, [(first, *map(int, r)) for r in rest]

    def tiles(self) -> Iterator[tuple[tuple[slice, ...], np.ndarray]]:
        """Each tile's box and its weight map (float32, the tile's shape)."""
        for _, corners in self.rows():
            for corner in corners:
                box = tuple(slice(a, a + t) for a, t in zip(corner, self.tile))
                yield box, self.weight(corner)


# -- reading tiles --------------------------------------------------------------------------------
Reader = Callable[[Sequence[int], Sequence[int]], torch.Tensor]


def array_reader(
    image: Any,
    device: torch.device | str = "cpu",
    transform: Callable[[np.ndarray], np.ndarray] | None = None,
    dtype: torch.dtype = torch.float32,
) -> Reader:
    """Read padded boxes of a channel-first image (numpy, memory map, lazy array or tensor).

    ``transform`` is applied to each box read from a non-tensor image (e.g. normalisation) before it
    becomes a tensor on ``device``.
    """
    spatial = tuple(int(s) for s in image.shape[1:])

    def read(start: Sequence[int], size: Sequence[int]) -> torch.Tensor:
        indices = [reflect_indices(a, a + n, s) for a, n, s in zip(start, size, spatial)]
        box = tuple(slice(int(i.min()), int(i.max()) + 1) for i in indices)
        local = np.ix_(*[i - i.min() for i in indices])
        if isinstance(image, torch.Tensor):
            part = image[(slice(None),) + box]
            index = tuple(torch.as_tensor(ix, device=part.device) for ix in local)
            return part[(slice(None),) + index].to(device=device, dtype=dtype)
        part = np.asarray(image[(slice(None),) + box])
        if transform is not None:
            part = transform(part)
        part = part[(slice(None),) + local]
        return torch.from_numpy(np.ascontiguousarray(part)).to(device=device, dtype=dtype)

    return read


# -- test-time augmentation ---------------------------------------------------------------------
def _dihedral(spatial_dims: int, tile: Sequence[int]) -> list[tuple[int, bool]]:
    """(quarter turns in the last two axes, flip of the last axis) pairs to average over."""
    turns = (0, 1, 2, 3) if tile[-1] == tile[-2] else (0, 2)
    return [(k, flip) for k in turns for flip in (False, True)]


ChannelMap = Callable[[torch.Tensor, int, bool], torch.Tensor]


Spread = Callable[[torch.Tensor], torch.Tensor]


def _apply_tta(fn: Callable[[torch.Tensor], torch.Tensor], batch: torch.Tensor, channel_map: ChannelMap | None,
               spread: Spread | None = None) -> torch.Tensor:
    """Average ``fn`` over flips and quarter turns of the last two axes, each undone on the output.

    ``channel_map(output, k, flip)`` fixes outputs whose channels depend on orientation (e.g.
    StarDist's ray distances); pixel-wise scalar outputs need none. With ``spread``, one more
    channel follows the average: how much the augmented predictions disagree, per pixel the root
    mean over the channels of ``spread(output)`` (e.g. class probabilities) of their standard
    deviation over the transforms.
    """
    dims = (batch.ndim - 2, batch.ndim - 1)
    total = None
    moments = None
    transforms = _dihedral(batch.ndim - 2, batch.shape[2:])
    for k, flip in transforms:
        x = torch.flip(batch, (dims[1],)) if flip else batch
        x = torch.rot90(x, k, dims)
        y = torch.rot90(fn(x), -k, dims)
        y = torch.flip(y, (dims[1],)) if flip else y
        if channel_map is not None:
            y = channel_map(y, k, flip)
        total = y.float() if total is None else total + y.float()
        if spread is not None:
            q = spread(y).double()
            moments = [q, q * q] if moments is None else [moments[0] + q, moments[1] + q * q]
    mean = total / len(transforms)
    if spread is None:
        return mean
    first, second = (m / len(transforms) for m in moments)
    variance = (second - first * first).clamp(min=0).mean(dim=1, keepdim=True)
    return torch.cat([mean, variance.sqrt().to(mean.dtype)], dim=1)


# -- the streaming predictor --------------------------------------------------------------------
Sink = Callable[[int, torch.Tensor], None]


def stream_predict(
    fn: Callable[[torch.Tensor], torch.Tensor],
    read: Reader,
    image_shape: Sequence[int],
    plan: TilePlan,
    sink: Sink,
    batch_size: int = 4,
    tta: bool = False,
    channel_map: ChannelMap | None = None,
    device: torch.device | str = "cpu",
    progress: bool | Callable[[int, int], None] = False,
    stride: Sequence[int] | None = None,
    spread: Spread | None = None,
) -> None:
    """Predict an image tile by tile and hand the blended output to ``sink`` strip by strip.

    ``sink(start, block)`` receives the final output for positions ``start .. start + len`` of the
    first spatial axis, as a tensor ``(K, rows, *rest)`` cropped to the image, in order. A network
    whose output is subsampled by ``stride`` (e.g. StarDist on a grid) gets its blocks in output
    coordinates, cropped to ``ceil(image_shape / stride)``. With ``tta`` and ``spread``, the blocks
    carry one channel more, last: the spread of the augmented predictions (:func:`_apply_tta`).
    ``progress``: a progress bar, or a function called as ``progress(tiles_done, tiles_total)``
    before the first tile and after each batch (what it raises stops the prediction: a cancel).
    """
    if spread is not None and not tta:
        raise ValueError("stream_predict: a spread needs tta")
    stride = tuple(int(g) for g in (stride or (1,) * len(image_shape)))
    image_shape = tuple(-(-int(s) // g) for s, g in zip(image_shape, stride))
    tiles_total = len(plan)
    out_plan = plan.scaled(stride)
    bar = None
    report = progress if callable(progress) else None
    tiles_done = 0
    if report is not None:
        report(0, tiles_total)
    elif progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=tiles_total, unit="tile", desc="tiles", leave=False)
    acc: torch.Tensor | None = None
    norm = torch.zeros((out_plan.tile[0],) + out_plan.shape[1:], device=device)
    strip_start = 0
    weights: dict[tuple[int, ...], torch.Tensor] = {}

    def weight_of(corner: tuple[int, ...]) -> torch.Tensor:
        key = tuple(int(a > 0) + 2 * int(a + t < s) for a, t, s in zip(corner, out_plan.tile, out_plan.shape))
        if key not in weights:  # tiles with the same border situation share a weight map
            weights[key] = torch.from_numpy(out_plan.weight(corner)).to(device)
        return weights[key]

    def emit(stop: int) -> None:
        """Hand rows [strip_start, stop) to the sink and shift the strip, in place."""
        nonlocal strip_start
        n = stop - strip_start
        keep = min(n, max(0, image_shape[0] - strip_start))
        if keep > 0:
            crop = (slice(None), slice(0, keep)) + tuple(slice(0, s) for s in image_shape[1:])
            sink(strip_start, acc[crop] / norm[crop[1:]])
        height = acc.shape[1]
        for dst in range(0, height - n, n):  # forward block copies never overlap their source
            size = min(n, height - n - dst)
            acc[:, dst:dst + size] = acc[:, dst + n:dst + n + size]
            norm[dst:dst + size] = norm[dst + n:dst + n + size]
        acc[:, max(0, height - n):] = 0
        norm[max(0, height - n):] = 0
        strip_start = stop

    row_starts = [first // stride[0] for first, _ in plan.rows()]
    for row, (first, corners) in enumerate(plan.rows()):
        for b in range(0, len(corners), batch_size):
            chunk = corners[b:b + batch_size]
            batch = torch.stack([read(corner, plan.tile) for corner in chunk])
            with torch.no_grad():
                pred = _apply_tta(fn, batch, channel_map, spread) if tta else fn(batch)
            if acc is None:
                dtype = torch.promote_types(pred.dtype, torch.float32)
                acc = torch.zeros((pred.shape[1], out_plan.tile[0]) + out_plan.shape[1:], device=device, dtype=dtype)
                norm = norm.to(dtype)
            for corner, p in zip(chunk, pred):
                corner = tuple(a // g for a, g in zip(corner, stride))
                w = weight_of(corner).to(acc.dtype)
                box = (slice(0, out_plan.tile[0]),) + tuple(
                    slice(a, a + t) for a, t in zip(corner[1:], out_plan.tile[1:])
                )
                acc[(slice(None),) + box] += p.to(acc.dtype) * w
                norm[box] += w
            if bar is not None:
                bar.update(len(chunk))
            if report is not None:
                tiles_done += len(chunk)
                report(tiles_done, tiles_total)
        stop = row_starts[row + 1] if row + 1 < len(row_starts) else row_starts[row] + out_plan.tile[0]
        emit(stop)
        release_freed_memory()
    if bar is not None:
        bar.close()


_malloc_trim: Any = None


def release_freed_memory() -> None:
    """Hand memory freed on the heap back to the system (glibc's ``malloc_trim``; elsewhere nothing).

    Between strips, the temporaries of the last one are freed but the C allocator keeps their
    pages; with small long-lived allocations in between it can never reuse them all, and the
    resident memory of a long stream would creep up strip by strip.
    """
    global _malloc_trim
    if _malloc_trim is None:
        import ctypes

        try:
            _malloc_trim = ctypes.CDLL(None).malloc_trim
        except (OSError, AttributeError):
            _malloc_trim = False
    if _malloc_trim:
        _malloc_trim(0)


def predict_tiled(
    fn: Callable[[torch.Tensor], torch.Tensor],
    image: torch.Tensor,
    tile: Sequence[int],
    overlap: Sequence[int],
    receptive_field: int,
    multiple: int = 1,
    batch_size: int = 4,
    tta: bool = False,
    blend: Blend = "cosine",
    channel_map: ChannelMap | None = None,
    stride: Sequence[int] | None = None,
    watch: Callable[[Callable, tuple[int, ...]], Callable] | None = None,
) -> torch.Tensor:
    """Tiled prediction of an in-memory image ``(C, *spatial)``; returns ``(K, *spatial / stride)`` on
    its device. ``watch(read, shape)``, when given, wraps the tile reader (a fit check riding along)."""
    shape = tuple(image.shape[1:])
    plan = TilePlan.create(shape, tile, overlap, receptive_field, multiple, blend)
    parts: list[torch.Tensor] = []
    read = array_reader(image, image.device, dtype=image.dtype)
    stream_predict(
        fn, read if watch is None else watch(read, shape), shape, plan,
        lambda start, block: parts.append(block), batch_size=batch_size, tta=tta, channel_map=channel_map,
        device=image.device, stride=stride,
    )
    return torch.cat(parts, dim=1)
