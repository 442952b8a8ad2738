"""Deterministic synthetic image pairs for restoration: clean structures and their noisy versions.

The clean image holds nuclei-like blobs with internal texture and/or thin, curved filaments
(``structures``), smooth at the scale of a few pixels, scaled to ``[0, peak]``. The degraded image adds, depending on
``noise``:

- ``gaussian``: pixel-wise independent Gaussian noise of standard deviation ``sigma`` (the
  Noise2Void setting);
- ``poisson_gaussian``: optional blur, then shot noise at ``photons`` photons for a full-scale
  pixel, then Gaussian read noise of ``sigma`` (a low-light acquisition; the CARE setting).

Both are returned in the same units (``peak`` = full scale), as float32.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
from scipy import ndimage


Structures = Literal["mixed", "blobs", "filaments"]


def clean_structures(shape: tuple[int, ...], rng: np.random.Generator, structures: Structures = "mixed") -> np.ndarray:
    """Nuclei-like blobs and/or thin filaments, in [0, 1] (2D or 3D)."""
    ndim = len(shape)
    image = np.zeros(shape, np.float32)
    area = float(np.prod(shape))
    n_blobs = max(1, int(area / (48.0**ndim) * 4))
    grid = np.indices(shape, dtype=np.float32)
    for _ in range(n_blobs):
        centre = rng.uniform(0, shape)
        radius = rng.uniform(5, 12, size=ndim)
        box = tuple(slice(max(0, int(c - 3 * r)), min(s, int(c + 3 * r) + 1)) for c, r, s in zip(centre, radius, shape))
        local = sum(((g[box] - c) / r) ** 2 for g, c, r in zip(grid, centre, radius))
        image[box] += rng.uniform(0.3, 1.0) * np.exp(-np.maximum(local, 0) ** 2)
    texture = ndimage.gaussian_filter(rng.normal(size=shape).astype(np.float32), 2.0)
    image *= 1 + 0.8 * texture / (texture.std() + 1e-6) * (image > 0.05)
    if structures == "filaments":
        image[:] = 0
    n_filaments = max(1, int(area / (128.0**ndim) * 4))
    lines = np.zeros(shape, np.float32)
    for _ in range(n_filaments):
        position = rng.uniform(0, shape)
        direction = rng.normal(size=ndim)
        for _ in range(int(max(shape) * 0.6)):
            direction += rng.normal(scale=0.15, size=ndim)
            direction /= np.linalg.norm(direction)
            position = position + direction
            index = tuple(int(p) for p in position)
            if all(0 <= i < s for i, s in zip(index, shape)):
                lines[index] = 1.0
    if structures != "blobs":
        image += 0.5 * ndimage.gaussian_filter(lines, 1.0) * 2.0 * np.pi
    image = ndimage.gaussian_filter(np.clip(image, 0, None), 1.0)
    return (image / max(float(np.percentile(image, 99.9)), 1e-6)).clip(0, 1).astype(np.float32)


def synthetic_restoration_pair(
    shape: tuple[int, ...],
    seed: int = 0,
    index: int = 0,
    noise: Literal["gaussian", "poisson_gaussian"] = "gaussian",
    sigma: float = 25.0,
    photons: float = 30.0,
    blur: float = 0.0,
    peak: float = 255.0,
    structures: Structures = "mixed",
) -> tuple[np.ndarray, np.ndarray]:
    """(degraded, clean) float32 images of ``shape`` in units where full scale is ``peak``."""
    rng = np.random.default_rng([seed, index, 7])
    clean = clean_structures(tuple(int(s) for s in shape), rng, structures)
    if noise == "gaussian":
        degraded = clean * peak + rng.normal(0.0, sigma, clean.shape)
    elif noise == "poisson_gaussian":
        signal = ndimage.gaussian_filter(clean, blur) if blur > 0 else clean
        degraded = rng.poisson(signal * photons) / photons * peak + rng.normal(0.0, sigma, clean.shape)
    else:
        raise ValueError(f"noise must be 'gaussian' or 'poisson_gaussian', got {noise!r}")
    return degraded.astype(np.float32), (clean * peak).astype(np.float32)
