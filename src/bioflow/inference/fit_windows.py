"""What the fit check measures in a window of an image: intensity and noise of its normalised
pixels (on a fixed lattice of them) and the mean of each of the network's feature maps over it.

:mod:`bioflow.inference.fit` places the windows in the tiles a prediction reads and scores their
features against the training data's fingerprint; the functions here measure them, several
windows of one tile at a time, so that the check costs a few milliseconds per image.
"""

from __future__ import annotations

import functools
from typing import Sequence

import numpy as np
import torch


def _on_grid(fine: torch.Tensor, grid: Sequence[int]) -> torch.Tensor:
    """Feature maps ``fine (B, K, *spatial)`` averaged onto a coarser ``grid`` of cells (exactly, by
    blocks, where the grid divides them), so that a window of the grid's cells covers the same pixels."""
    spatial, d, functional = tuple(fine.shape[2:]), len(grid), torch.nn.functional
    fine = fine.detach().float()
    if tuple(grid) == spatial:
        return fine
    if all(s % g == 0 for s, g in zip(spatial, grid)):
        return getattr(functional, f"avg_pool{d}d")(fine, [s // g for s, g in zip(spatial, grid)])
    return getattr(functional, f"adaptive_avg_pool{d}d")(fine, list(grid))


#: Pixels (and neighbour differences) per window and channel that the intensity and noise
#: features are measured on: a fixed lattice through the window, so the cost does not grow with it.
SAMPLES = 2048


@functools.lru_cache(maxsize=64)
def _lattice_index(n: int) -> np.ndarray:
    """``SAMPLES`` evenly spaced indices into ``n`` values (repeats where n is smaller)."""
    return torch.linspace(0, n - 1, SAMPLES).round().long().numpy()


def window_samples(crop: np.ndarray) -> np.ndarray:
    """What the intensity and noise features of one normalised window ``crop (C, *window)``
    (float32, on the host) are measured on: ``(C, 2, SAMPLES)``, pixels and differences of
    neighbours along the last axis, on a fixed lattice."""
    flat = crop.reshape(crop.shape[0], -1)
    step = (crop[..., 1:] - crop[..., :-1]).reshape(crop.shape[0], -1) if crop.shape[-1] > 1 else flat * 0
    return np.stack([flat[:, _lattice_index(flat.shape[1])], step[:, _lattice_index(step.shape[1])]], axis=1)


@functools.lru_cache(maxsize=64)
def _lattice_offsets(box: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray | None]:
    """The lattice of :func:`window_samples` for windows of shape ``box`` as offsets ``(d, SAMPLES)``
    from the window's corner: of the pixels, and of the left pixel of each neighbour difference
    (None when the last axis has one pixel: no differences)."""
    pixels = np.stack(np.unravel_index(_lattice_index(int(np.prod(box))), box))
    if box[-1] < 2:
        return pixels, None
    inner = (*box[:-1], box[-1] - 1)
    return pixels, np.stack(np.unravel_index(_lattice_index(int(np.prod(inner))), inner))


def windows_samples(host: np.ndarray, corners: np.ndarray, box: tuple[int, ...]) -> np.ndarray:
    """:func:`window_samples` of several windows of one shape ``box`` at ``corners (W, d)`` of
    ``host (C, *spatial)``, by flat gathers: ``(W, C, 2, SAMPLES)``, the same values."""
    pixels, lefts = _lattice_offsets(tuple(int(b) for b in box))
    strides = np.array([int(np.prod(host.shape[a + 2:])) for a in range(host.ndim - 1)], dtype=np.int64)
    flat = host.reshape(host.shape[0], -1)
    base = (corners @ strides)[:, None]  # (W, 1)
    values = np.take(flat, base + strides @ pixels, axis=1)  # (C, W, SAMPLES)
    if lefts is None:
        steps = values * 0
    else:
        left = base + strides @ lefts
        steps = np.take(flat, left + 1, axis=1) - np.take(flat, left, axis=1)
    return np.stack([values, steps], axis=2).transpose(1, 0, 2, 3)


def window_content(maps: torch.Tensor, corners: np.ndarray, cells: Sequence[int], spread: bool) -> np.ndarray:
    """Each feature map's mean (and, with ``spread``, its standard deviation) over windows of
    ``cells`` at ``corners (W, d)`` of ``maps (K, *spatial)``, on the host: ``(W, K)`` or
    ``(W, 2K)``. Maps on the CPU are reduced in place by NumPy (which follows their memory
    layout; PyTorch's copies of small strided blocks, e.g. of channels-last maps, cost more than
    the arithmetic); from other devices only the windows travel, copied out together."""
    boxes = [(slice(None), *(slice(int(a), int(a) + int(c)) for a, c in zip(corner, cells))) for corner in corners]
    if maps.device.type == "cpu":
        source = maps.detach().float().numpy()
        windows = [source[box] for box in boxes]
    else:
        windows = list(torch.stack([maps.detach()[box] for box in boxes]).float().cpu().numpy())
    axes = tuple(range(1, len(cells) + 1))
    return np.stack([np.concatenate([w.mean(axis=axes, dtype=np.float64)]
                                    + ([w.std(axis=axes, dtype=np.float64)] if spread else [])) for w in windows]).astype(np.float32)


def _quantiles(values: np.ndarray, qs: Sequence[float]) -> list[np.ndarray]:
    """Quantiles along the last axis, interpolated linearly as ``np.quantile`` does, from one sort
    (for several quantiles NumPy's vectorised sort of a few thousand values is several times
    faster than a partial sort at their positions, and gives the same order statistics; for the
    median alone, :func:`_median` is faster)."""
    n = values.shape[-1]
    ordered = np.sort(values, axis=-1)
    out = []
    for q in qs:
        position = q * (n - 1)
        below = int(np.floor(position))
        above = min(below + 1, n - 1)
        out.append(ordered[..., below] + (position - below) * (ordered[..., above] - ordered[..., below]))
    return out


def _median(values: np.ndarray) -> np.ndarray:
    """The median along the last axis, as ``np.quantile(values, 0.5, axis=-1)``, from one partial
    sort at a single position (3 times faster than a full sort of 2048 values); for an even count
    the value below it is the largest of those partitioned before it."""
    n = values.shape[-1]
    below, above = (n - 1) // 2, n // 2
    parted = np.partition(values, above, axis=-1)
    high = parted[..., above]
    if above == below:
        return high
    low = parted[..., :above].max(axis=-1)
    return low + 0.5 * (high - low)


def window_features(samples: np.ndarray, content: np.ndarray) -> np.ndarray:
    """Features of windows: intensity percentiles and noise of their normalised pixels, from
    ``samples (W, C, 2, SAMPLES)`` (:func:`window_samples`), then their content ``(W, K)``."""
    low, mid, high = _quantiles(samples[:, :, 0], (0.01, 0.5, 0.99))
    step = samples[:, :, 1]
    deviation = np.abs(step - _median(step)[..., None])
    spread = np.maximum(high - low, 1e-6)
    noise = 1.4826 * _median(deviation) / np.sqrt(2) / spread
    return np.concatenate([low, mid, high, np.log(np.maximum(noise, 1e-6)), content], axis=1).astype(np.float64)
